//! Sync sessions through the public API: a channel that loses, duplicates and reorders; the byte
//! and round-trip targets; retained cursors; an adversarial peer.

use std::sync::Arc;

use engine::feedsync::{Content, Edit, Endpoint, ItemId, When};
use engine::loopback::{self, Fate, Faulty, Plain};
use engine::replica::Replica;
use engine::sync::{Config, Outcome, Retained, Session, Stats};
use proptest::prelude::*;

fn content(text: &str) -> Edit {
    Edit {
        content: Some(Arc::new(Content {
            attrs: "".into(),
            inner: format!("<title>{text}</title>").into(),
            ..Content::empty()
        })),
        ..Edit::default()
    }
}

/// Two replicas sharing `common` items, then `only_a` / `only_b` new items each and `both`
/// concurrent edits of common items.
fn pair(common: usize, only_a: usize, only_b: usize, both: usize) -> (Replica, Replica) {
    let (mut a, mut b) = (Replica::new(1), Replica::new(2));
    let origin = Endpoint::new("origin").unwrap();
    let t0 = When::from_unix_secs(1_600_000_000).unwrap();
    let mut base = Replica::new(0);
    for i in 0..common {
        base.change(&ItemId::new(&format!("c{i}")).unwrap(), &origin, &t0, &content(&format!("c{i}")))
            .unwrap();
    }
    for item in base.items() {
        a.merge(item).unwrap();
        b.merge(item).unwrap();
    }
    let (ea, eb) = (Endpoint::new("a").unwrap(), Endpoint::new("b").unwrap());
    let t1 = When::from_unix_secs(1_600_000_100).unwrap();
    for i in 0..only_a {
        a.change(&ItemId::new(&format!("a{i}")).unwrap(), &ea, &t1, &content("a")).unwrap();
    }
    for i in 0..only_b {
        b.change(&ItemId::new(&format!("b{i}")).unwrap(), &eb, &t1, &content("b")).unwrap();
    }
    for i in 0..both.min(common) {
        let id = ItemId::new(&format!("c{i}")).unwrap();
        a.change(&id, &ea, &t1, &content("edit a")).unwrap();
        b.change(&id, &eb, &t1, &content("edit b")).unwrap();
    }
    (a, b)
}

/// Channel faults, in parts per million.
#[derive(Clone, Copy, Debug)]
struct Faults {
    loss_ppm: u64,
    dup_ppm: u64,
    jitter_us: u64,
}

const CLEAN: Faults = Faults { loss_ppm: 0, dup_ppm: 0, jitter_us: 0 };

struct Run {
    a: Stats,
    b: Stats,
    messages: u64,
    a_outcome: Outcome,
    /// The virtual clock when both sides fell quiet.
    now: u64,
}

/// Runs one session, `a` initiating, over a faulty channel with a virtual clock: each message
/// arrives after a millisecond plus jitter, unless lost, and maybe twice.
fn run(a: &mut Replica, b: &mut Replica, retained: Retained, faults: Faults, seed: u64, cfg: Config) -> Run {
    let mut rng = seed;
    let mut next = move || {
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut channel = Faulty::new(|_, _: &[u8]| {
        let mut fate = Fate::LOST;
        let copies = if next() % 1_000_000 < faults.dup_ppm { 2 } else { 1 };
        for copy in fate.copies.iter_mut().take(copies) {
            if next() % 1_000_000 < faults.loss_ppm {
                continue;
            }
            *copy = Some(1_000 + if faults.jitter_us > 0 { next() % faults.jitter_us } else { 0 });
        }
        fate
    });
    let mut sa = Plain::initiate(7, 0, a, cfg.clone(), retained);
    let mut sb = Plain::respond(7, b, cfg);
    let pumped = loopback::run_faulty(&mut sa, &mut sb, &mut channel, 0, 100_000);
    Run {
        a: sa.session.stats(),
        b: sb.session.stats(),
        messages: pumped.messages,
        a_outcome: sa.session.outcome().clone(),
        now: pumped.now,
    }
}

fn item_sets_equal(a: &Replica, b: &Replica) -> bool {
    a.len() == b.len() && a.items().zip(b.items()).all(|(x, y)| x == y)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// After a completed session under loss, duplication and reordering, both replicas have
    /// identical digests and equal item sets.
    #[test]
    fn converges_under_loss_duplication_and_reordering(
        common in 0usize..200, only_a in 0usize..40, only_b in 0usize..40, both in 0usize..20,
        loss_ppm in 0u64..300_000, dup_ppm in 0u64..300_000, jitter_us in 0u64..50_000,
        seed in any::<u64>(), retained in any::<bool>(),
    ) {
        let (mut a, mut b) = pair(common, only_a, only_b, both);
        let cfg = Config { max_retries: 30, initial_symbols: 4, max_message_bytes: 16 * 1024, linger_us: 3_600_000_000, ..Config::default() };
        // A first clean session, so that a retained-cursor session can follow.
        let mut keep = Retained::default();
        if retained {
            let first = run(&mut a, &mut b, Retained::default(), CLEAN, seed, cfg.clone());
            if let Outcome::Done { retained, .. } = first.a_outcome { keep = retained; }
            let ea = Endpoint::new("a").unwrap();
            let t2 = When::from_unix_secs(1_600_000_200).unwrap();
            for i in 0..only_a { a.change(&ItemId::new(&format!("n{i}")).unwrap(), &ea, &t2, &content("new")).unwrap(); }
            let eb = Endpoint::new("b").unwrap();
            for i in 0..both.min(common) { b.change(&ItemId::new(&format!("c{i}")).unwrap(), &eb, &t2, &content("again")).unwrap(); }
        }
        let faults = Faults { loss_ppm, dup_ppm, jitter_us };
        let r = run(&mut a, &mut b, keep, faults, seed, cfg);
        prop_assert!(matches!(r.a_outcome, Outcome::Done { .. }), "session did not finish: {:?}", r.a_outcome);
        a.check_invariants().unwrap();
        b.check_invariants().unwrap();
        prop_assert_eq!(a.digest(), b.digest());
        prop_assert!(item_sets_equal(&a, &b));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Over a clean, ordered channel (a QUIC stream), sides that send chunks ahead of the peer's
    /// `Continue` end equal, whatever the window and the path, with the same messages as without.
    #[test]
    fn sessions_sending_ahead_converge_on_an_ordered_channel(
        common in 0usize..200, only_a in 0usize..300, only_b in 0usize..300, both in 0usize..20,
        ahead in 1u32..5, retained in any::<bool>(), seed in any::<u64>(),
    ) {
        let cfg = |send_ahead| Config { initial_symbols: 4, max_message_bytes: 4 * 1024, send_ahead, ..Config::default() };
        let mut messages = Vec::new();
        let mut ends = Vec::new();
        for send_ahead in [0, ahead] {
            let (mut a, mut b) = pair(common, only_a, only_b, both);
            let mut keep = Retained::default();
            if retained {
                let first = run(&mut a, &mut b, Retained::default(), CLEAN, seed, cfg(send_ahead));
                if let Outcome::Done { retained, .. } = first.a_outcome { keep = retained; }
                let ea = Endpoint::new("a").unwrap();
                let t2 = When::from_unix_secs(1_600_000_200).unwrap();
                for i in 0..only_a { a.change(&ItemId::new(&format!("n{i}")).unwrap(), &ea, &t2, &content("new")).unwrap(); }
                let eb = Endpoint::new("b").unwrap();
                for i in 0..only_b { b.change(&ItemId::new(&format!("m{i}")).unwrap(), &eb, &t2, &content("new")).unwrap(); }
            }
            let r = run(&mut a, &mut b, keep, CLEAN, seed, cfg(send_ahead));
            prop_assert!(matches!(r.a_outcome, Outcome::Done { .. }), "ahead {}: {:?}", send_ahead, r.a_outcome);
            a.check_invariants().unwrap();
            b.check_invariants().unwrap();
            prop_assert_eq!(a.digest(), b.digest());
            prop_assert!(item_sets_equal(&a, &b));
            messages.push(r.messages);
            ends.push(a.digest());
        }
        prop_assert_eq!(messages[0], messages[1], "sending ahead changes when chunks go, not which");
        prop_assert_eq!(ends[0], ends[1]);
    }
}

/// A responder serving an empty initiator 2,000 items in 4 KiB chunks: sending three chunks
/// ahead takes well under half the time of one chunk per `Continue` (each message takes a
/// millisecond), with the same messages.
#[test]
fn chunks_sent_ahead_do_not_wait_for_each_continue() {
    let mut times = Vec::new();
    for send_ahead in [0, 3] {
        let (mut a, mut b) = pair(0, 0, 2_000, 0);
        let cfg = Config { max_message_bytes: 4 * 1024, send_ahead, ..Config::default() };
        let r = run(&mut a, &mut b, Retained::default(), CLEAN, 1, cfg);
        assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
        assert!(item_sets_equal(&a, &b));
        assert!(r.b.messages_sent > 20, "several chunks: {}", r.b.messages_sent);
        times.push((r.now, r.messages));
    }
    assert_eq!(times[0].1, times[1].1);
    assert!(times[1].0 * 2 < times[0].0, "{times:?}");
}

/// A responder whose last `Changes` went while chunks sent ahead were unanswered ends only once
/// the initiator's `Continue`s for them came: over a stream, ending earlier drops the stream the
/// initiator is still writing them on, and the initiator's session then fails.
#[test]
fn a_responder_ends_only_after_its_chunks_sent_ahead_are_answered() {
    use engine::loopback::{End, Plain};
    let cfg = Config { max_message_bytes: 4 * 1024, send_ahead: 1, ..Config::default() };
    let (mut a, mut b) = pair(10, 0, 0, 0);
    let first = run(&mut a, &mut b, Retained::default(), CLEAN, 1, cfg.clone());
    let Outcome::Done { retained, .. } = first.a_outcome else { panic!("{:?}", first.a_outcome) };
    let eb = Endpoint::new("b").unwrap();
    let t2 = When::from_unix_secs(1_600_000_200).unwrap();
    for i in 0..300 {
        b.change(&ItemId::new(&format!("m{i}")).unwrap(), &eb, &t2, &content("new")).unwrap();
    }
    let mut sa = Plain::initiate(8, 0, &mut a, cfg.clone(), retained);
    let mut sb = Plain::respond(8, &mut b, cfg);
    let (mut to_a, mut to_b) = (std::collections::VecDeque::new(), std::collections::VecDeque::new());
    let mut chunks = 0;
    // The responder's messages are all handled first (a fast link), the initiator's answers
    // then one at a time.
    loop {
        to_b.extend(std::iter::from_fn(|| sa.poll_transmit()));
        let sent: Vec<Vec<u8>> = std::iter::from_fn(|| sb.poll_transmit()).collect();
        chunks += sent.len();
        to_a.extend(sent);
        if let Some(m) = to_a.pop_front() {
            sa.handle_message(1, &m);
            continue;
        }
        let Some(m) = to_b.pop_front() else { break };
        sb.handle_message(1, &m);
        if sb.outcome() != Outcome::Running {
            assert!(to_b.is_empty(), "the responder ended with {} answers still to come", to_b.len());
        }
    }
    assert!(chunks > 3, "several chunks: {chunks}");
    assert!(matches!(sa.outcome(), Outcome::Done { .. }), "{:?}", sa.outcome());
    assert!(matches!(sb.outcome(), Outcome::Done { .. }), "{:?}", sb.outcome());
    drop((sa, sb));
    assert_eq!(a.digest(), b.digest());
}

fn round_trips(r: &Run) -> u64 {
    r.messages.div_ceil(2)
}

/// d = 1, no retained state: at most 3 round trips and 2 kB in total.
#[test]
fn one_difference_in_a_large_set_is_cheap() {
    let n = 100_000;
    let (mut a, mut b) = pair(n, 1, 0, 0);
    let r = run(&mut a, &mut b, Retained::default(), CLEAN, 1, Config::default());
    let total = r.a.bytes_sent + r.b.bytes_sent;
    println!(
        "sync: n={n} d=1 full: {} round trips, {total} bytes, payload {}",
        round_trips(&r),
        r.a.payload_bytes_sent + r.b.payload_bytes_sent
    );
    assert_eq!(a.digest(), b.digest());
    assert!(round_trips(&r) <= 3);
    assert!(total <= 2_000, "{total} bytes");
}

/// A new device (nothing held) learns everything without reconciliation: the responder sends its
/// items at once, chunked, with no `More` rounds and only the Hello's symbols.
#[test]
fn an_empty_initiator_gets_everything_without_reconciling() {
    let n = 5_000;
    let (mut a, mut b) = pair(0, 0, n, 0);
    assert_eq!(a.len(), 0);
    let cfg = Config { max_message_bytes: 64 * 1024, ..Config::default() };
    let r = run(&mut a, &mut b, Retained::default(), CLEAN, 1, cfg.clone());
    assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
    assert_eq!(a.digest(), b.digest());
    assert_eq!(r.b.items_sent, n as u64);
    assert_eq!(r.a.symbols_sent, cfg.initial_symbols, "no symbols past the Hello's");
    // One message per chunk each way, plus Hello and Done.
    let chunks = r.b.payload_bytes_sent.div_ceil(cfg.max_message_bytes as u64 - 256);
    assert!(round_trips(&r) <= chunks + 2, "{} round trips for {chunks} chunks", round_trips(&r));
    // A second session from the filled replica reconciles as before (equal digests: Done at once).
    let again = run(&mut a, &mut b, Retained::default(), CLEAN, 2, Config::default());
    assert_eq!(round_trips(&again), 1);
}

/// A change the responder merges from elsewhere while it serves an empty initiator everything is
/// not passed by the cursor the initiator keeps: its next incremental session gets it. (The swarm
/// found the fast path reporting the responder's log as of `Done`, seed 89.)
#[test]
fn a_change_made_while_an_empty_initiator_is_served_reaches_it_next_time() {
    let (mut a, mut b) = pair(0, 0, 3, 0);
    let cfg = Config::default();
    let mut sa = Session::initiate(9, 0, &a, cfg.clone(), Retained::default());
    let mut sb = Session::respond(9, &b, cfg.clone());
    let hello = sa.poll_transmit().expect("a Hello");
    sb.handle_message(1, &mut b, &hello).unwrap();
    let diff = sb.poll_transmit().expect("everything, at once");
    // Meanwhile another peer's change reaches the responder.
    let other = Endpoint::new("other").unwrap();
    let t = When::from_unix_secs(1_700_000_000).unwrap();
    b.change(&ItemId::new("late").unwrap(), &other, &t, &content("late")).unwrap();
    sa.handle_message(2, &mut a, &diff).unwrap();
    while let Some(m) = sa.poll_transmit() {
        sb.handle_message(3, &mut b, &m).unwrap();
        while let Some(reply) = sb.poll_transmit() {
            sa.handle_message(4, &mut a, &reply).unwrap();
        }
    }
    let Outcome::Done { retained, .. } = sa.outcome().clone() else { panic!("{:?}", sa.outcome()) };
    assert!(a.item(&ItemId::new("late").unwrap()).is_none(), "the late change came after the Diff");
    let r = run(&mut a, &mut b, retained, CLEAN, 3, cfg);
    assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
    assert_eq!(a.digest(), b.digest(), "the next session brings the late change");
}

/// With retained cursors: one round trip, and at most 64 B + 8 B per changed item beyond the payload.
#[test]
fn retained_cursors_take_one_round_trip() {
    let (mut a, mut b) = pair(10_000, 0, 0, 0);
    let first = run(&mut a, &mut b, Retained::default(), CLEAN, 1, Config::default());
    let Outcome::Done { retained, .. } = first.a_outcome else { panic!("first session failed") };
    let (ea, eb) = (Endpoint::new("a").unwrap(), Endpoint::new("b").unwrap());
    let t = When::from_unix_secs(1_700_000_000).unwrap();
    for i in 0..10 {
        a.change(&ItemId::new(&format!("c{i}")).unwrap(), &ea, &t, &content("x")).unwrap();
        b.change(&ItemId::new(&format!("c{}", 100 + i)).unwrap(), &eb, &t, &content("y")).unwrap();
    }
    let r = run(&mut a, &mut b, retained, CLEAN, 2, Config::default());
    let total = r.a.bytes_sent + r.b.bytes_sent;
    let payload = r.a.payload_bytes_sent + r.b.payload_bytes_sent;
    let changed = r.a.items_sent + r.b.items_sent;
    println!(
        "sync: retained, {changed} changed items: {} round trips, {total} bytes, {} beyond payload",
        round_trips(&r),
        total - payload
    );
    assert_eq!(a.digest(), b.digest());
    assert_eq!(round_trips(&r), 1);
    assert!(total - payload <= 64 + 8 * changed, "{} beyond payload for {changed} items", total - payload);
}

/// What a node merged from one peer is announced to the next by fingerprint: sent only when that
/// peer lacks it (two round trips), never when it has it already (one round trip, 8 bytes each).
#[test]
fn relayed_changes_are_announced_and_sent_only_when_wanted() {
    let t = When::from_unix_secs(1_700_000_000).unwrap();
    let ea = Endpoint::new("a").unwrap();
    let (mut a, mut b, mut c) = (Replica::new(1), Replica::new(2), Replica::new(3));
    let mut retained_bc = Retained::default();
    let Outcome::Done { retained, .. } =
        run(&mut b, &mut c, retained_bc, CLEAN, 1, Config::default()).a_outcome
    else {
        panic!("first b-c session failed")
    };
    retained_bc = retained;
    for i in 0..20 {
        a.change(&ItemId::new(&format!("x{i}")).unwrap(), &ea, &t, &content("x")).unwrap();
    }
    // b merges a's writes; c has none of them: b announces 20, c wants 20.
    run(&mut a, &mut b, Retained::default(), CLEAN, 2, Config::default());
    let r = run(&mut b, &mut c, retained_bc, CLEAN, 3, Config::default());
    let Outcome::Done { retained, .. } = r.a_outcome else { panic!("b-c session failed") };
    assert_eq!(b.digest(), c.digest());
    assert_eq!(round_trips(&r), 2);
    assert_eq!(r.a.items_sent, 20, "the wanted items travel once");
    // a writes 20 more; both b and c get them from a; b's next push to c announces, c wants none.
    for i in 20..40 {
        a.change(&ItemId::new(&format!("x{i}")).unwrap(), &ea, &t, &content("x")).unwrap();
    }
    run(&mut a, &mut b, Retained::default(), CLEAN, 4, Config::default());
    run(&mut a, &mut c, Retained::default(), CLEAN, 5, Config::default());
    let r = run(&mut b, &mut c, retained, CLEAN, 6, Config::default());
    assert_eq!(b.digest(), c.digest());
    assert_eq!(round_trips(&r), 1);
    assert_eq!(r.a.items_sent + r.b.items_sent, 0, "nothing is echoed");
    assert!(r.a.bytes_sent <= 64 + 8 * 20, "an announcement costs 8 bytes a change: {}", r.a.bytes_sent);
}

/// Without `linger_after_hello`, a responder that answered the Hello is finished at once; when
/// that answer is lost, the repeated Hello is answered by a new responder and the session ends
/// as if nothing had happened.
#[test]
fn a_repeated_hello_meets_a_new_responder() {
    let (mut a, mut b) = pair(50, 3, 4, 2);
    let cfg = Config { linger_after_hello: false, ..Config::default() };
    let first = run(&mut a, &mut b, Retained::default(), CLEAN, 1, cfg.clone());
    let Outcome::Done { retained, .. } = first.a_outcome else { panic!("first session failed") };
    let t = When::from_unix_secs(1_700_000_000).unwrap();
    a.change(&ItemId::new("new-a").unwrap(), &Endpoint::new("a").unwrap(), &t, &content("a")).unwrap();
    b.change(&ItemId::new("new-b").unwrap(), &Endpoint::new("b").unwrap(), &t, &content("b")).unwrap();
    let mut init = Session::initiate(7, 0, &a, cfg.clone(), retained);
    let hello = init.poll_transmit().expect("a Hello");
    let mut first_responder = Session::respond(7, &b, cfg.clone());
    first_responder.handle_message(0, &mut b, &hello).unwrap();
    let _lost = first_responder.poll_transmit().expect("Changes");
    assert!(matches!(first_responder.outcome(), Outcome::Done { .. }));
    assert_eq!(first_responder.poll_timeout(), None, "finished, not lingering");
    // The initiator's timer fires: it repeats the Hello, byte for byte.
    let deadline = init.poll_timeout().expect("a retransmission timer");
    init.handle_timeout(deadline);
    let again = init.poll_transmit().expect("the Hello again");
    assert_eq!(again, hello);
    let mut second_responder = Session::respond(7, &b, cfg);
    second_responder.handle_message(deadline, &mut b, &again).unwrap();
    let changes = second_responder.poll_transmit().expect("Changes");
    init.handle_message(deadline + 1, &mut a, &changes).unwrap();
    assert!(matches!(init.outcome(), Outcome::Done { .. }), "{:?}", init.outcome());
    assert_eq!(a.digest(), b.digest());
}

mod adversary {
    //! A malicious peer: well-formed messages with arbitrary content, in arbitrary order, and
    //! arbitrary bytes. The session must not panic, must stay within its limits, and the replica
    //! must keep its invariants (and change only by merging valid items).
    use super::*;
    use engine::riblt::Symbol;
    use engine::wire::{
        self, Body, Fixed64, Message, Push, WireCursor, WireEntry, WireItem, WireSymbol, WireVersion,
    };

    fn wire_item(id: String, updates: u32, seq: u32, by: Option<String>) -> WireItem {
        WireItem {
            id,
            endpoints: by.iter().cloned().collect(),
            version: WireVersion {
                updates,
                flags: 0,
                history: vec![WireEntry { sequence: seq, when: None, by: by.map(|_| 0) }],
                attrs: String::new(),
                inner: "<title>evil</title>".into(),
                scope: vec![],
                signature: None,
            },
            conflicts: vec![],
        }
    }

    fn body() -> impl Strategy<Value = Body> {
        let item = ("[a-c]{0,2}", 0u32..3, 0u32..3, proptest::option::of("[a-b]{0,1}"))
            .prop_map(|(id, u, s, by)| wire_item(id, u, s, by));
        let items = prop::collection::vec(item, 0..4);
        let cursor = (0u64..3, 0u64..50).prop_map(|(epoch, seq)| WireCursor { epoch, seq });
        let symbol = (any::<u64>(), any::<u64>(), -3i64..3)
            .prop_map(|(s, c, n)| WireSymbol::from(Symbol { sum: s, check: c, count: n }));
        let symbols = prop::collection::vec(symbol, 0..8);
        let fingerprints = prop::collection::vec(any::<u64>().prop_map(Fixed64::from), 0..4);
        prop_oneof![
            (
                cursor.clone(),
                any::<u64>(),
                proptest::option::of(cursor.clone()),
                proptest::option::of((0u64..3, 0u64..9, items.clone(), fingerprints.clone())),
                symbols.clone(),
                fingerprints.clone()
            )
                .prop_map(|(log, digest, cursor, push, symbols, held)| Body::Hello {
                    log,
                    count: 3,
                    digest: Fixed64::from(digest),
                    cursor,
                    push: push.map(|(epoch, from, items, have)| Push { epoch, from, items, have }),
                    symbols,
                    held,
                }),
            (cursor.clone(), items.clone(), any::<bool>(), fingerprints.clone(), fingerprints.clone())
                .prop_map(|(log, items, more, want, held)| Body::Changes { log, items, more, want, held }),
            any::<u64>().prop_map(|upto| Body::More { upto }),
            (0u64..40, symbols).prop_map(|(from, symbols)| Body::Symbols { from, symbols }),
            (
                cursor.clone(),
                prop::collection::vec(any::<u64>().prop_map(Fixed64::from), 0..4),
                items.clone(),
                any::<bool>(),
                fingerprints
            )
                .prop_map(|(log, want, items, more, held)| Body::Diff {
                    log,
                    want,
                    items,
                    more,
                    held
                }),
            (items, any::<bool>()).prop_map(|(items, more)| Body::Items { items, more }),
            Just(Body::Continue),
            (cursor, any::<u64>()).prop_map(|(log, d)| Body::Done { log, digest: Fixed64::from(d) }),
        ]
    }

    fn frames() -> impl Strategy<Value = Vec<(u32, Body)>> {
        prop::collection::vec((0u32..8, body()), 1..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn hostile_messages_never_corrupt(frames in frames(), initiator in any::<bool>(), junk in prop::collection::vec(any::<u8>(), 0..64)) {
            let (mut mine, _) = pair(20, 3, 0, 2);
            let before = mine.digest();
            let cfg = Config { max_message_bytes: 4096, max_symbols: 256, ..Config::default() };
            let mut session = if initiator {
                Session::initiate(9, 0, &mine, cfg.clone(), Retained::default())
            } else {
                Session::respond(9, &mine, cfg.clone())
            };
            let mut now = 0;
            let mut sent = 0usize;
            let _ = session.handle_message(now, &mut mine, &junk);
            for (step, body) in frames {
                now += 1_000;
                let bytes = wire::encode(&Message { version: wire::WIRE_VERSION, session: 9, step, body });
                let _ = session.handle_message(now, &mut mine, &bytes);
                session.handle_timeout(now + 10_000_000);
                while let Some(out) = session.poll_transmit() {
                    prop_assert!(out.len() <= cfg.max_message_bytes, "sent {} bytes", out.len());
                    sent += 1;
                }
                mine.check_invariants().map_err(TestCaseError::fail)?;
            }
            prop_assert!(sent <= 24 * 2 + cfg.max_retries as usize + 2, "bounded output: {sent}");
            let _ = before;
        }
    }
}

/// Issue 11, defect 1: a (reportedly 46-byte) Hello whose two coded symbols make one element pure twice.
/// Before the fix the responder's decoder appended that element until the allocator failed (a
/// relay served it under its global lock). Now the session fails at once with a typed error.
#[test]
fn a_hello_with_self_repeating_symbols_is_refused() {
    let hex = "0201000001010101000000000000000000020100000000000000608d2b490200000000000000000000000000";
    let mut bytes: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    // The report calls it a 46-byte Hello; the hex it gives is the 44-byte engine message.
    assert_eq!(bytes.len(), 44);
    // Recorded at wire version 2; the message is otherwise unchanged since but for version 6's
    // `held` list, last in a Hello: empty here.
    assert_eq!(bytes[0], 2);
    bytes[0] = engine::wire::WIRE_VERSION;
    bytes.push(0);
    let mut replica = Replica::new(1);
    let id = Session::session_of(&bytes, Config::default().max_message_bytes).expect("the Hello decodes");
    let mut session = Session::respond(id, &replica, Config::default());
    let err = session.handle_message(0, &mut replica, &bytes).expect_err("refused");
    assert!(matches!(err, engine::sync::SyncError::Symbols(_)), "{err}");
    assert!(replica.is_empty());
}

/// Issue 12, item 6: an item that cannot travel in one sync message is never made. A local write
/// past the limit is refused with a typed error and changes nothing; two concurrent versions that
/// each fit but together would not merge into an item that keeps only the conflicts that fit (the
/// same on both sides); and sessions after both go on syncing, with a third replica too. Before
/// the bound, the merged item (winner and conflict, about 1.2 MB) was sent alone in a message
/// over the 1 MiB limit, which the peer refused: every later session with it failed.
#[test]
fn items_too_large_for_a_message_are_never_made_and_sessions_go_on() {
    use engine::feedsync::{limits::ITEM_ENCODED_MAX, FeedsyncError};
    let big = |fill: char, bytes: usize| Edit {
        content: Some(Arc::new(Content {
            attrs: "".into(),
            inner: format!("<title>{}</title>", fill.to_string().repeat(bytes)).into(),
            ..Content::empty()
        })),
        ..Edit::default()
    };
    let (mut a, mut b) = pair(10, 0, 0, 0);
    let (ea, eb) = (Endpoint::new("a").unwrap(), Endpoint::new("b").unwrap());
    let t = When::from_unix_secs(1_600_000_300).unwrap();
    let before = a.digest();
    let refused = a.change(&ItemId::new("huge").unwrap(), &ea, &t, &big('h', 1_100_000));
    assert!(
        matches!(refused, Err(FeedsyncError::TooLarge { bytes, .. }) if bytes > ITEM_ENCODED_MAX),
        "{refused:?}"
    );
    assert_eq!(a.digest(), before, "a refused write changes nothing");
    // Concurrent edits of one item, 600 kB each: together over the limit.
    let id = ItemId::new("c0").unwrap();
    a.change(&id, &ea, &t, &big('a', 600_000)).unwrap();
    b.change(&id, &eb, &t, &big('b', 600_000)).unwrap();
    a.change(&ItemId::new("small").unwrap(), &ea, &t, &content("after")).unwrap();
    let r = run(&mut a, &mut b, Retained::default(), CLEAN, 7, Config::default());
    assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
    a.check_invariants().unwrap();
    b.check_invariants().unwrap();
    assert_eq!(a.digest(), b.digest());
    let merged = a.item(&id).unwrap();
    assert!(merged.encoded_bound() <= ITEM_ENCODED_MAX);
    assert!(merged.conflicts.is_empty(), "the losing 600 kB version does not fit beside the winner");
    // A third replica takes everything from a, in a fresh full reconciliation.
    let mut c = Replica::new(3);
    let r = run(&mut c, &mut a, Retained::default(), CLEAN, 8, Config::default());
    assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
    assert_eq!(c.digest(), a.digest());
    // And a later session between a and b still runs.
    b.change(&ItemId::new("later").unwrap(), &eb, &t, &content("later")).unwrap();
    let r = run(&mut a, &mut b, Retained::default(), CLEAN, 9, Config::default());
    assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
    assert_eq!(a.digest(), b.digest());
}

/// Sessions on retained cursors send each version of an item once: a hot item holding a
/// conflict per concurrent writer costs the versions the peer lacks, not all of them.
#[test]
fn a_hot_item_sends_only_the_versions_the_peer_lacks() {
    let id = ItemId::new("hot").unwrap();
    let t = When::from_unix_secs(1_700_000_000).unwrap();
    let (mut a, mut b) = (Replica::new(1), Replica::new(2));
    // 20 writers edit the item concurrently; a holds all their versions.
    let write = |replica: &mut Replica, who: &str| {
        let mut w = Replica::new(100);
        w.change(&id, &Endpoint::new(who).unwrap(), &t, &content(who)).unwrap();
        replica.merge(w.item(&id).unwrap()).unwrap();
    };
    for k in 0..20 {
        write(&mut a, &format!("writer{k}"));
    }
    assert_eq!(a.item(&id).unwrap().conflicts.len(), 19);
    let first = run(&mut a, &mut b, Retained::default(), CLEAN, 1, Config::default());
    let Outcome::Done { retained, .. } = first.a_outcome else { panic!("first session failed") };
    assert_eq!(a.digest(), b.digest());
    let whole = first.b.payload_bytes_sent + first.a.payload_bytes_sent;
    // Two more concurrent writers reach a only; the next session carries their two versions.
    write(&mut a, "late0");
    write(&mut a, "late1");
    let r = run(&mut a, &mut b, retained, CLEAN, 2, Config::default());
    let Outcome::Done { retained, .. } = r.a_outcome else { panic!("second session failed") };
    assert_eq!(a.digest(), b.digest());
    assert!(item_sets_equal(&a, &b));
    let sent = r.a.payload_bytes_sent + r.b.payload_bytes_sent;
    println!("hot item: whole {whole} bytes, two new versions {sent} bytes");
    assert!(sent * 5 < whole, "{sent} bytes for 2 of 22 versions (the whole item was {whole})");
    // b writes on top (its version subsumes the winner only); a gets that version alone, and
    // nothing that a sent comes back.
    b.change(&id, &Endpoint::new("b").unwrap(), &t, &content("b")).unwrap();
    let r = run(&mut a, &mut b, retained, CLEAN, 3, Config::default());
    assert_eq!(a.digest(), b.digest());
    assert!(r.a.payload_bytes_sent + r.b.payload_bytes_sent < whole / 5);
}

/// Wire version 6: versions of a hot item that both sides got from third devices do not travel
/// between them, on retained cursors (the `Hello` names the versions the initiator merged since
/// the last session, `Changes` those of them the responder holds too) and in a full
/// reconciliation (the `Hello` names all of the initiator's, `Diff` the responder's). Without
/// that, each side sent the other the ten shared versions it got after the last session.
#[test]
fn versions_both_sides_got_elsewhere_do_not_travel_between_them() {
    let id = ItemId::new("hot").unwrap();
    let t = When::from_unix_secs(1_700_000_000).unwrap();
    let versions = |who: &str| {
        let mut w = Replica::new(100);
        w.change(&id, &Endpoint::new(who).unwrap(), &t, &content(who)).unwrap();
        w.item(&id).unwrap().clone()
    };
    let (mut a, mut b, mut c) = (Replica::new(1), Replica::new(2), Replica::new(3));
    for k in 0..20 {
        let v = versions(&format!("writer{k}"));
        for r in [&mut a, &mut b, &mut c] {
            r.merge(&v).unwrap();
        }
    }
    let whole = {
        let mut empty = Replica::new(9);
        let r = run(&mut a, &mut empty, Retained::default(), CLEAN, 1, Config::default());
        r.a.payload_bytes_sent + r.b.payload_bytes_sent
    };
    let first = run(&mut a, &mut b, Retained::default(), CLEAN, 2, Config::default());
    let Outcome::Done { retained, .. } = first.a_outcome else { panic!("first session failed") };
    // Ten more writers reach all three from elsewhere; each side also gets one of its own.
    for k in 0..10 {
        let v = versions(&format!("late{k}"));
        for r in [&mut a, &mut b, &mut c] {
            r.merge(&v).unwrap();
        }
    }
    a.merge(&versions("only-a")).unwrap();
    b.merge(&versions("only-b")).unwrap();
    c.merge(&versions("only-c")).unwrap();
    assert_ne!(a.digest(), b.digest());
    let r = run(&mut a, &mut b, retained, CLEAN, 3, Config::default());
    assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
    assert_eq!(a.digest(), b.digest());
    assert!(item_sets_equal(&a, &b));
    assert_eq!(a.item(&id).unwrap().conflicts.len(), 31);
    let sent = r.a.payload_bytes_sent + r.b.payload_bytes_sent;
    println!("retained cursors: 2 of 32 versions, {sent} bytes (the 20-version item whole: {whole})");
    assert!(sent * 5 < whole, "{sent} bytes for the two versions each side lacked (whole: {whole})");
    // a and c never synced: a full reconciliation, the same two-version exchange.
    let r = run(&mut c, &mut a, Retained::default(), CLEAN, 4, Config::default());
    assert!(matches!(r.a_outcome, Outcome::Done { .. }), "{:?}", r.a_outcome);
    assert_eq!(a.digest(), c.digest());
    assert!(item_sets_equal(&a, &c));
    let sent = r.a.payload_bytes_sent + r.b.payload_bytes_sent;
    println!("full reconciliation: 3 of 33 versions, {sent} bytes");
    assert!(sent * 3 < whole, "{sent} bytes for the versions each side lacked (whole: {whole})");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Replicas that write concurrently to a few items and sync pairwise on retained cursors
    /// (each session sending only the versions its peer lacks) end equal once every pair has
    /// synced after the last write, whatever the order of writes and sessions.
    #[test]
    fn sessions_that_send_only_missing_versions_converge(
        steps in proptest::collection::vec((0usize..4, 0usize..4, 0usize..3, any::<bool>()), 1..60),
        seed in any::<u64>(),
    ) {
        let t = When::from_unix_secs(1_700_000_000).unwrap();
        let mut replicas: Vec<Replica> = (0..4).map(|k| Replica::new(k as u64 + 1)).collect();
        let mut kept: std::collections::BTreeMap<(usize, usize), Retained> = Default::default();
        let mut session = |replicas: &mut Vec<Replica>, x: usize, y: usize, seed: u64| {
            let (lo, hi) = replicas.split_at_mut(x.max(y));
            let (rx, ry) = if x < y { (&mut lo[x], &mut hi[0]) } else { (&mut hi[0], &mut lo[y]) };
            let before = kept.get(&(x, y)).copied().unwrap_or_default();
            let r = run(rx, ry, before, CLEAN, seed, Config::default());
            let Outcome::Done { retained, .. } = r.a_outcome else { panic!("session failed: {:?}", r.a_outcome) };
            kept.insert((x, y), retained);
            // A clean session leaves the two sides equal.
            assert_eq!(rx.digest(), ry.digest(), "after a session of {x} with {y}");
            assert!(item_sets_equal(rx, ry));
        };
        for (k, (x, y, item, write)) in steps.into_iter().enumerate() {
            if write {
                let id = ItemId::new(&format!("i{item}")).unwrap();
                let by = Endpoint::new(&format!("w{x}")).unwrap();
                replicas[x].change(&id, &by, &t, &content(&format!("{k}"))).unwrap();
            } else if x != y {
                session(&mut replicas, x, y, seed.wrapping_add(k as u64));
            }
        }
        // Two rounds of every ordered pair spread everything everywhere.
        for round in 0..2 {
            for x in 0..4 {
                for y in 0..4 {
                    if x != y {
                        session(&mut replicas, x, y, seed ^ (round * 16 + x * 4 + y) as u64);
                    }
                }
            }
        }
        for r in &replicas {
            r.check_invariants().unwrap();
            prop_assert_eq!(r.digest(), replicas[0].digest());
            prop_assert!(item_sets_equal(r, &replicas[0]));
        }
    }
}

//! Property tests of the merge laws on feeds that endpoints build by real operations:
//! commutativity, associativity, idempotence, and convergence of any delivery order with
//! duplicates (twins from crashed endpoints included), with no accepted write lost.

use engine::feedsync::{Endpoint, Feed, Item};
use proofs::{apply, deliver, empty_feed, item_id, merged, state_bytes, Op, OPS};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

const ENDPOINTS: usize = 3;
const ITEMS: usize = 3;

#[derive(Clone, Debug)]
enum Step {
    /// Endpoint makes a local change to an item.
    Local { ep: usize, item: usize, op: Op },
    /// `to` merges everything `from` has.
    Sync { from: usize, to: usize },
    /// Endpoint crashes and comes back without its last local change (which it had already
    /// sent), then changes the same item again: the new change reuses the lost one's sequence
    /// number, making twins (the case the profile's twins rule is for). The endpoint makes no
    /// further change to that item: see proofs/README.md for why continuing under the same
    /// endpoint id cannot converge in FeedSync, and what the replica layer does instead.
    Crash { ep: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..ENDPOINTS, 0..ITEMS, prop::sample::select(OPS.to_vec()))
            .prop_map(|(ep, item, op)| Step::Local { ep, item, op }),
        3 => (0..ENDPOINTS, 0..ENDPOINTS).prop_map(|(from, to)| Step::Sync { from, to }),
        1 => (0..ENDPOINTS).prop_map(|ep| Step::Crash { ep }),
    ]
}

/// The outcome of a script: the endpoints' replicas and every item state any of them sent.
struct Run {
    replicas: Vec<Feed>,
    sent: Vec<Item>,
}

fn run(script: &[Step], skew: [i64; ENDPOINTS]) -> Run {
    let mut replicas: Vec<Feed> = (0..ENDPOINTS).map(|_| empty_feed()).collect();
    let mut before_last: Vec<Option<(Feed, usize, Op)>> = vec![None; ENDPOINTS];
    let mut steps = [0u32; ENDPOINTS];
    let mut retired: Vec<Vec<usize>> = vec![Vec::new(); ENDPOINTS];
    let mut sent = Vec::new();
    for s in script {
        match *s {
            Step::Local { ep, item, op } => {
                if retired[ep].contains(&item) {
                    continue;
                }
                before_last[ep] = Some((replicas[ep].clone(), item, op));
                steps[ep] += 1;
                let id = item_id(item);
                apply(&mut replicas[ep], ep, &id, op, steps[ep], skew[ep]);
                sent.push(replicas[ep].item(&id).expect("just changed").clone());
            }
            Step::Sync { from, to } => {
                if from != to {
                    let incoming = replicas[from].clone();
                    replicas[to] = merged(&replicas[to], &incoming);
                    sent.extend(incoming.items().cloned());
                }
            }
            Step::Crash { ep } => {
                if let Some((previous, item, op)) = before_last[ep].take() {
                    replicas[ep] = previous;
                    retired[ep].push(item);
                    steps[ep] += 1;
                    let id = item_id(item);
                    apply(&mut replicas[ep], ep, &id, op, steps[ep], skew[ep]);
                    sent.push(replicas[ep].item(&id).expect("just changed").clone());
                }
            }
        }
    }
    for replica in &replicas {
        replica.check_invariants().expect("replica invariants");
    }
    Run { replicas, sent }
}

/// Fisher-Yates with splitmix64: a delivery order from a seed, every state at least once, then
/// duplicates of random states mixed in.
fn delivery_order(len: usize, seed: u64, duplicates: usize) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..len).collect();
    if len == 0 {
        return order;
    }
    for _ in 0..duplicates {
        order.push((next() % len as u64) as usize);
    }
    for i in (1..order.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn skews() -> impl Strategy<Value = [i64; ENDPOINTS]> {
    [-30i64..30, -30i64..30, -30i64..30]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        // Relative to the package root (cargo runs tests there); committed.
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/laws.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn merge_commutes(script in prop::collection::vec(step(), 0..40), skew in skews()) {
        let Run { replicas, .. } = run(&script, skew);
        for a in &replicas {
            for b in &replicas {
                prop_assert_eq!(state_bytes(&merged(a, b)), state_bytes(&merged(b, a)));
            }
        }
    }

    #[test]
    fn merge_associates(script in prop::collection::vec(step(), 0..40), skew in skews()) {
        let Run { replicas, .. } = run(&script, skew);
        let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
        let left = merged(&merged(a, b), c);
        let right = merged(a, &merged(b, c));
        prop_assert_eq!(state_bytes(&left), state_bytes(&right));
    }

    #[test]
    fn merge_is_idempotent(script in prop::collection::vec(step(), 0..40), skew in skews()) {
        let Run { replicas, .. } = run(&script, skew);
        for a in &replicas {
            prop_assert_eq!(state_bytes(&merged(a, a)), state_bytes(a));
            for b in &replicas {
                let ab = merged(a, b);
                prop_assert_eq!(state_bytes(&merged(&ab, b)), state_bytes(&ab));
                prop_assert_eq!(state_bytes(&merged(&ab, a)), state_bytes(&ab));
            }
        }
    }

    /// Any delivery order of the same item states, with duplicates, gives the same feed, and
    /// every write made is in it (as a winner, a conflict or in the history of one).
    #[test]
    fn any_delivery_order_converges(
        script in prop::collection::vec(step(), 0..48),
        skew in skews(),
        seeds in prop::collection::vec(any::<u64>(), 3),
        duplicates in 0usize..16,
    ) {
        let Run { sent, .. } = run(&script, skew);
        let mut finals = Vec::new();
        for seed in seeds {
            let mut feed = empty_feed();
            for i in delivery_order(sent.len(), seed, duplicates) {
                deliver(&mut feed, &sent[i]);
                feed.check_invariants().expect("invariants after every delivery");
            }
            finals.push(feed);
        }
        let first = state_bytes(&finals[0]);
        for other in &finals[1..] {
            prop_assert_eq!(&state_bytes(other), &first);
        }
        // Durability: each write's (by, sequence) survives in the final item of its id.
        let mut writes_by_item: std::collections::BTreeMap<String, Vec<(Endpoint, u32)>> = Default::default();
        for state in &sent {
            let top = state.version.topmost();
            if let Some(by) = &top.by {
                writes_by_item.entry(state.id().to_string()).or_default().push((by.clone(), top.sequence));
            }
        }
        for (id, writes) in writes_by_item {
            let id = engine::feedsync::ItemId::new(&id).expect("valid");
            let item = finals[0].item(&id).expect("every sent item is in the final feed");
            let lost = proofs::lost_writes(item, &writes);
            prop_assert!(lost.is_empty(), "lost writes {:?} in {:?}", lost, item);
        }
    }
}

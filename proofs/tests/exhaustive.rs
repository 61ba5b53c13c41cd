//! Exhaustive small-scope check of convergence: 3 endpoints, each making up to N local
//! operations (update, delete, resolve) on one item, with every order of delivery between them.
//!
//! The model: a local operation changes the endpoint's replica and sends the resulting item state
//! to everyone; a sent state can be delivered to any endpoint at any time, any number of times
//! (so every reordering and duplication is covered). The search visits every reachable state
//! once. Item states are interned and merges memoised, so a state is a few integers. At every
//! quiescent state (no delivery would change any replica) all replicas must be equal and every
//! write must survive; after every event the replica's invariants must hold.
//!
//! `FEEDMESH_EXHAUSTIVE_OPS` sets N. The default suite runs N = 2 (seconds); N = 3, the full scope,
//! takes longer and runs when the variable says so (see proofs/README.md for its figures).

use std::collections::{HashMap, HashSet};

use engine::feedsync::{self, Endpoint, Item};
use proofs::{empty_feed, item_id, state_bytes, Op, OPS};

const ENDPOINTS: usize = 3;
const OPS_MAX: usize = 3;
/// Interned id of "no item yet".
const NONE: u32 = 0;

/// Every distinct item state seen, and memoised transitions between them.
struct Universe {
    items: Vec<Option<Item>>,
    index: HashMap<String, u32>,
    merges: HashMap<(u32, u32), u32>,
    locals: HashMap<(u32, usize, Op, u32), u32>,
}

impl Universe {
    fn new() -> Self {
        let mut index = HashMap::new();
        index.insert(String::new(), NONE);
        Self { items: vec![None], index, merges: HashMap::new(), locals: HashMap::new() }
    }

    fn intern(&mut self, item: Item) -> u32 {
        let key = describe(&item);
        if let Some(&id) = self.index.get(&key) {
            return id;
        }
        let id = self.items.len() as u32;
        self.items.push(Some(item));
        self.index.insert(key, id);
        id
    }

    /// The replica `local` after receiving the sent state `incoming`.
    fn merge(&mut self, local: u32, incoming: u32) -> u32 {
        if let Some(&out) = self.merges.get(&(local, incoming)) {
            return out;
        }
        let out = match (&self.items[local as usize], &self.items[incoming as usize]) {
            (_, None) => local,
            (None, Some(_)) => incoming,
            (Some(l), Some(i)) => {
                let (merged, _) = feedsync::merge_item(l, i);
                merged.check_invariants().expect("invariants after a merge");
                self.intern(merged)
            }
        };
        self.merges.insert((local, incoming), out);
        out
    }

    /// The replica `local` of endpoint `e` after its `step`-th local operation `op`.
    fn local(&mut self, local: u32, e: usize, op: Op, step: u32) -> u32 {
        if let Some(&out) = self.locals.get(&(local, e, op, step)) {
            return out;
        }
        let id = item_id(0);
        let mut feed = empty_feed();
        if let Some(item) = &self.items[local as usize] {
            feed.put(item.clone()).expect("one item");
        }
        proofs::apply(&mut feed, e, &id, op, step, 0);
        let item = feed.item(&id).expect("just changed").clone();
        item.check_invariants().expect("invariants after a local operation");
        let out = self.intern(item);
        self.locals.insert((local, e, op, step), out);
        out
    }
}

fn describe(item: &Item) -> String {
    let mut feed = empty_feed();
    feed.put(item.clone()).expect("one item");
    state_bytes(&feed)
}

/// A global state: each endpoint's replica and operation count, and the set of sent states that
/// some endpoint has not absorbed yet. A sent state every replica has absorbed (delivering it
/// changes nothing anywhere) is retired: it is left out of the state's identity, since a later
/// delivery cannot change anything either. That this holds is checked, not assumed: every
/// state re-checks that each retired state is still absorbed by every replica.
#[derive(Clone)]
struct State {
    replicas: [u32; ENDPOINTS],
    ops_done: [u8; ENDPOINTS],
    /// Sorted, deduplicated interned ids (at most ENDPOINTS * OPS_MAX).
    sent: Vec<u32>,
    retired: Vec<u32>,
}

impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        self.replicas == other.replicas && self.ops_done == other.ops_done && self.sent == other.sent
    }
}
impl Eq for State {}
impl std::hash::Hash for State {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.replicas.hash(h);
        self.ops_done.hash(h);
        self.sent.hash(h);
    }
}

#[derive(Default, Debug)]
struct Report {
    states: u64,
    quiescent: u64,
    finals: HashSet<u32>,
}

fn explore(budget: [u8; ENDPOINTS]) -> (Report, Universe) {
    assert!(budget.iter().all(|&b| usize::from(b) <= OPS_MAX));
    let mut u = Universe::new();
    let start = State {
        replicas: [NONE; ENDPOINTS],
        ops_done: [0; ENDPOINTS],
        sent: Vec::new(),
        retired: Vec::new(),
    };
    let mut seen: HashSet<State> = HashSet::new();
    let mut stack = vec![start];
    let mut report = Report::default();
    while let Some(mut state) = stack.pop() {
        // Retire what every replica has absorbed; check that retired states stay absorbed.
        let mut k = 0;
        while k < state.sent.len() {
            let m = state.sent[k];
            if (0..ENDPOINTS).all(|e| u.merge(state.replicas[e], m) == state.replicas[e]) {
                state.sent.remove(k);
                state.retired.push(m);
            } else {
                k += 1;
            }
        }
        for &m in &state.retired {
            for e in 0..ENDPOINTS {
                assert_eq!(
                    u.merge(state.replicas[e], m),
                    state.replicas[e],
                    "a sent state that every replica had absorbed is no longer absorbed by endpoint {e}"
                );
            }
        }
        if seen.contains(&state) {
            continue;
        }
        seen.insert(state.clone());
        report.states += 1;
        let mut quiescent = true;
        for &m in &state.sent {
            for e in 0..ENDPOINTS {
                let after = u.merge(state.replicas[e], m);
                if after != state.replicas[e] {
                    quiescent = false;
                    let mut next = state.clone();
                    next.replicas[e] = after;
                    stack.push(next);
                }
            }
        }
        #[allow(clippy::needless_range_loop)] // e indexes three arrays
        for e in 0..ENDPOINTS {
            if state.ops_done[e] >= budget[e] {
                continue;
            }
            for op in OPS {
                let mut next = state.clone();
                next.ops_done[e] += 1;
                let after = u.local(state.replicas[e], e, op, u32::from(next.ops_done[e]));
                next.replicas[e] = after;
                if let Err(at) = next.sent.binary_search(&after) {
                    next.sent.insert(at, after);
                }
                stack.push(next);
            }
        }
        if quiescent {
            report.quiescent += 1;
            check_quiescent(&u, &state);
            if state.ops_done == budget {
                report.finals.insert(state.replicas[0]);
            }
        }
    }
    (report, u)
}

fn check_quiescent(u: &Universe, state: &State) {
    for e in 1..ENDPOINTS {
        assert_eq!(
            state.replicas[e],
            state.replicas[0],
            "quiescent replicas differ: endpoint 0 has\n{}\nendpoint {e} has\n{}",
            u.items[state.replicas[0] as usize].as_ref().map(describe).unwrap_or_default(),
            u.items[state.replicas[e] as usize].as_ref().map(describe).unwrap_or_default(),
        );
    }
    let Some(item) = &u.items[state.replicas[0] as usize] else { return };
    let writes: Vec<(Endpoint, u32)> = state
        .sent
        .iter()
        .chain(&state.retired)
        .filter_map(|&m| u.items[m as usize].as_ref())
        .filter_map(|s| s.version.topmost().by.clone().map(|by| (by, s.version.topmost().sequence)))
        .collect();
    let lost = proofs::lost_writes(item, &writes);
    assert!(lost.is_empty(), "lost writes {lost:?} at a quiescent state:\n{}", describe(item));
}

/// Operation budgets per endpoint: `FEEDMESH_EXHAUSTIVE_OPS` as `N` (every endpoint N) or
/// `a,b,c`; several scopes separated by `;`.
fn scopes() -> Vec<[u8; ENDPOINTS]> {
    let spec = std::env::var("FEEDMESH_EXHAUSTIVE_OPS").unwrap_or_else(|_| DEFAULT_SCOPES.to_string());
    spec.split(';')
        .map(|scope| {
            let parts: Vec<u8> = scope
                .split(',')
                .map(|p| p.trim().parse().expect("FEEDMESH_EXHAUSTIVE_OPS: numbers"))
                .collect();
            match parts.as_slice() {
                [n] => [*n; ENDPOINTS],
                [a, b, c] => [*a, *b, *c],
                _ => panic!("FEEDMESH_EXHAUSTIVE_OPS: N or a,b,c (scopes separated by ';')"),
            }
        })
        .collect()
}

/// What the default suite runs: every endpoint 2 operations; two endpoints with 3 each.
const DEFAULT_SCOPES: &str = "2,2,2;3,3,0";

#[test]
fn every_schedule_of_three_endpoints_converges() {
    for budget in scopes() {
        let (report, universe) = explore(budget);
        println!(
            "exhaustive: budgets {budget:?} (update/delete/resolve): {} states, {} quiescent, \
             {} distinct item states, {} distinct final items",
            report.states,
            report.quiescent,
            universe.items.len() - 1,
            report.finals.len()
        );
        assert!(report.quiescent > 0);
        // The search really explored concurrent histories: more than one outcome is reachable.
        assert!(budget.iter().filter(|&&b| b > 0).count() < 2 || report.finals.len() > 1);
    }
    if std::env::var_os("FEEDMESH_EXHAUSTIVE_OPS").is_none() {
        println!("exhaustive: larger scopes run with FEEDMESH_EXHAUSTIVE_OPS (e.g. '3,3,1' or '3'); see proofs/README.md");
    }
}

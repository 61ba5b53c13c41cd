//! The counterexamples of proofs/README.md, as tests: where FeedSync's own rules do not converge,
//! and what our profile does about it.

use std::sync::Arc;

use engine::feedsync::{merge_item, Content, Edit, Endpoint, HistoryEntry, Item, ItemId, Version, When};
use proofs::{apply, deliver, empty_feed, endpoint, item_id, state_bytes, Op};

fn entry(seq: u32, by: &str, secs: i64) -> HistoryEntry {
    HistoryEntry {
        sequence: seq,
        when: Some(When::from_unix_secs(1_700_000_000 + secs).unwrap()),
        by: Some(Endpoint::new(by).unwrap()),
    }
}

fn version(history: Vec<HistoryEntry>, title: &str) -> Version {
    Version {
        id: ItemId::new("x").unwrap(),
        updates: history[0].sequence,
        deleted: false,
        noconflicts: false,
        history: Arc::from(history),
        content: Arc::new(Content {
            attrs: "".into(),
            inner: format!("<title>{title}</title>").into(),
            ..Content::empty()
        }),
        signature: None,
    }
}

fn merge_all(items: &[&Item]) -> Item {
    let mut acc = items[0].clone();
    for item in &items[1..] {
        acc = merge_item(&acc, item).0;
    }
    acc
}

/// Deviation 1. With the spec's update (own conflicts dropped without their history),
/// `b1 ⊑ c2 ⊑ c4` but not `b1 ⊑ c4`, and two delivery orders of the same three states differ.
#[test]
fn spec_update_without_fold_diverges_and_ours_converges() {
    let b1 = Item::new(version(vec![entry(1, "B", 10)], "b1"));
    let c2 = Item::new(version(vec![entry(2, "C", 20), entry(1, "B", 10)], "c2"));
    let a3 = version(vec![entry(3, "A", 30), entry(2, "A", 25), entry(1, "A", 5)], "a3");
    // C holds a3 with c2 as a conflict and updates. The spec's c4 forgets c2's 1@B.
    let spec_c4 = Item::new(version(
        vec![entry(4, "C", 40), entry(3, "A", 30), entry(2, "A", 25), entry(1, "A", 5)],
        "c4",
    ));
    let one = merge_all(&[&b1, &c2, &spec_c4]);
    let two = merge_all(&[&c2, &spec_c4, &b1]);
    assert_ne!(one, two, "the spec's rule diverges");
    assert!(one.conflicts.is_empty() && two.conflicts.len() == 1, "b1 survives in one order only");

    // Ours: the same update folds the dropped conflict's history.
    let at_c = Item { version: a3, conflicts: vec![c2.version.clone()] };
    let ours_c4 = at_c
        .update(&Endpoint::new("C").unwrap(), &When::from_unix_secs(1_700_000_040).unwrap(), &Edit::default())
        .unwrap();
    assert!(ours_c4.conflicts.is_empty());
    assert!(b1.version.subsumed_by(&ours_c4.version), "c4 records that it has seen b1");
    let one = merge_all(&[&b1, &c2, &ours_c4]);
    let two = merge_all(&[&c2, &ours_c4, &b1]);
    let three = merge_all(&[&ours_c4, &b1, &c2]);
    assert_eq!(one, two);
    assert_eq!(two, three);
}

/// The limit of the twins rule: an endpoint that loses a sent change and then keeps changing the
/// same item under the same id makes the lost change vanish; under a new endpoint id the lost
/// change survives as a conflict.
#[test]
fn crash_then_continue_needs_a_new_endpoint_id() {
    let id = item_id(0);
    for new_id_after_crash in [false, true] {
        // c creates the item; a receives it and updates it (the state `lost` is sent) ...
        let (mut a, mut b, mut c) = (empty_feed(), empty_feed(), empty_feed());
        apply(&mut c, 2, &id, Op::Update, 1, 0);
        deliver(&mut a, c.item(&id).unwrap());
        let before_crash = a.clone();
        apply(&mut a, 0, &id, Op::Update, 1, 0);
        let lost = a.item(&id).unwrap().clone();
        // ... then crashes back to before that update. b makes two updates meanwhile.
        a = before_crash;
        apply(&mut b, 1, &id, Op::Update, 1, 0);
        apply(&mut b, 1, &id, Op::Update, 2, 0);
        deliver(&mut a, b.item(&id).unwrap());
        // a updates again: as "ep-a" (same id) or as a new incarnation "ep-a#2".
        let after = if new_id_after_crash {
            let by = Endpoint::new("ep-a#2").unwrap();
            let when = proofs::when(3, 0);
            a.change(&id, &by, &when, &Edit::default()).unwrap();
            a.item(&id).unwrap().clone()
        } else {
            apply(&mut a, 0, &id, Op::Update, 3, 0);
            a.item(&id).unwrap().clone()
        };
        assert_eq!(after.conflicts.len(), 1, "a still holds c's version as a conflict");

        let mut first = empty_feed();
        deliver(&mut first, &after);
        deliver(&mut first, &lost);
        let mut second = empty_feed();
        deliver(&mut second, &lost);
        deliver(&mut second, &after);
        if new_id_after_crash {
            assert_eq!(state_bytes(&first), state_bytes(&second), "a new endpoint id converges");
            let item = first.item(&id).unwrap();
            assert!(item.conflicts.contains(&lost.version), "and the lost change survives");
        } else {
            // Under the same id the later update claims (by sequence) to have seen the lost one,
            // so the lost change vanishes in either order. (With the spec's asymmetric steps 3
            // and 4 the two orders also diverged here; the merge now takes the maximal versions
            // of both sides, so they agree, on the wrong answer.)
            for state in [&first, &second] {
                let item = state.item(&id).unwrap();
                assert!(
                    item.version != lost.version && !item.conflicts.contains(&lost.version),
                    "the same id loses the lost change"
                );
            }
        }
    }
    let _ = endpoint(0);
}

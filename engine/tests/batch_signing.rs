//! Batch signatures (issue 16): a bulk write signs one Merkle root per `BATCH_MAX` versions,
//! each version carries its path, verifies on its own, and survives the wire, the FeedSync
//! extension element and forwarding; a forged version inside a batch is refused while the honest
//! versions of its batch are still taken.

use std::sync::Arc;

use engine::feedsync::xml;
use engine::feedsync::{Content, Dialect, Edit, Feed, Item, ItemId, When};
use engine::replica::Replica;
use engine::signing::{
    verify_version, DeviceId, DeviceKey, FeedScope, SignatureError, SignatureForm, Verified,
    VersionSignature, BATCH_MAX,
};
use engine::wire;

const SCOPE: FeedScope = FeedScope([9; 16]);

fn key(n: u8) -> DeviceKey {
    DeviceKey::from_bytes(&[n; 32])
}

fn edit(text: &str) -> Edit {
    Edit { content: Some(Arc::new(Content { inner: text.into(), ..Content::empty() })), ..Edit::default() }
}

fn when() -> When {
    When::from_unix_secs(1_700_000_000).unwrap()
}

/// `n` changes to distinct ids.
fn changes(n: usize) -> Vec<(ItemId, Edit)> {
    (0..n).map(|i| (ItemId::new(&format!("item-{i:04}")).unwrap(), edit(&format!("text {i}")))).collect()
}

/// A signed replica holding `n` items written in one bulk write by `key(1)`.
fn written(n: usize) -> Replica {
    let mut r = Replica::new_signed(1, SCOPE);
    assert_eq!(r.change_signed_many(&key(1), &when(), &changes(n)).unwrap(), n);
    r
}

fn items(r: &Replica) -> Vec<Arc<Item>> {
    r.items().cloned().collect()
}

#[test]
fn every_version_of_a_bulk_write_verifies_on_its_own_in_either_form() {
    for n in [1, 2, 3, 5, BATCH_MAX - 1, BATCH_MAX, BATCH_MAX + 1, 100] {
        let r = written(n);
        let mut batched = 0;
        for item in r.items() {
            assert_eq!(verify_version(&item.version, &SCOPE).unwrap(), DeviceId::of(&key(1)), "n = {n}");
            if matches!(&*item.version.signature.as_ref().unwrap().0, SignatureForm::Batch(_)) {
                batched += 1;
            }
        }
        // Only a version alone in its batch (n = 1, or the last of BATCH_MAX + 1) is single.
        let singles = usize::from(n % BATCH_MAX == 1);
        assert_eq!(batched, n - singles, "n = {n}");
        // Another folder's scope refuses every one of them (no replay across folders).
        for item in r.items() {
            assert!(verify_version(&item.version, &FeedScope([8; 16])).is_err());
        }
    }
}

#[test]
fn a_bulk_write_signs_once_per_batch() {
    let r = written(100);
    let roots: std::collections::BTreeSet<[u8; 64]> = r
        .items()
        .filter_map(|i| match &*i.version.signature.as_ref()?.0 {
            SignatureForm::Batch(p) => Some(p.root_signature.0),
            SignatureForm::Single(s) => Some(s.0),
        })
        .collect();
    assert_eq!(roots.len(), 100usize.div_ceil(BATCH_MAX), "one signature per {BATCH_MAX} versions");
}

#[test]
fn a_forged_version_inside_a_batch_is_refused_and_the_honest_ones_are_taken() {
    let source = written(BATCH_MAX);
    let mut all = items(&source);
    // The forgery: item 3's content replaced, its batch signature and path kept.
    let mut forged = (*all[3]).clone();
    forged.version.content = Arc::new(Content { inner: "forged".into(), ..Content::empty() });
    let forged_id = forged.id().clone();
    all[3] = Arc::new(forged);
    assert!(matches!(verify_version(&all[3].version, &SCOPE), Err(SignatureError::Invalid { .. })));

    // Item by item (as a peer forwarding honest versions would give them): every honest version
    // of the batch is taken, the forged one refused.
    let mut dest = Replica::new_signed(2, SCOPE);
    for item in &all {
        let taken = dest.merge(item);
        if item.id() == &forged_id {
            assert!(taken.is_err(), "the forged version is refused");
        } else {
            assert!(taken.unwrap(), "an honest version of the batch is taken");
        }
    }
    assert_eq!(dest.len(), BATCH_MAX - 1);
    assert!(dest.item(&forged_id).is_none());

    // In one message (a batch merge), the message is refused whole, as before batches: nothing
    // of it is merged.
    let mut whole = Replica::new_signed(3, SCOPE);
    assert!(whole.merge_all(&all, 2).is_err());
    assert_eq!(whole.len(), 0);

    // Checked ahead of the merge (`Verified::check`, as the binaries do): the forged version is
    // not vouched for, so the merge verifies it itself and refuses it.
    let plain: Vec<Item> = all.iter().map(|i| (**i).clone()).collect();
    let verified = Verified::check(&plain, &SCOPE, None, 2);
    let mut checked = Replica::new_signed(4, SCOPE);
    checked.set_verified(verified);
    assert!(checked.merge(&all[3]).is_err());
    assert!(checked.merge(&all[0]).unwrap());
}

#[test]
fn a_proof_altered_anywhere_does_not_verify() {
    let r = written(8);
    let item = r.items().nth(5).unwrap().clone();
    let bytes = item.version.signature.as_ref().unwrap().to_bytes();
    assert_eq!(bytes.len(), 67 + 32 * 3, "a batch of 8 has depth 3");
    // Every byte of the proof matters: signature, depth, index, siblings.
    for at in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        let Some(sig) = VersionSignature::from_bytes(&bad) else { continue };
        let mut v = item.version.clone();
        v.signature = Some(sig);
        assert!(verify_version(&v, &SCOPE).is_err(), "byte {at} altered still verifies");
    }
    // A version may not claim another's place: the same proof with index 4 fails.
    let mut moved = bytes.clone();
    moved[65] = 4;
    let mut v = item.version.clone();
    v.signature = VersionSignature::from_bytes(&moved);
    assert!(verify_version(&v, &SCOPE).is_err());
}

#[test]
fn signature_bytes_of_no_form_are_refused() {
    for len in [0, 1, 63, 65, 66, 67, 98, 100, 67 + 32 * 6] {
        assert!(VersionSignature::from_bytes(&vec![0; len]).is_none(), "{len} bytes");
    }
    // Depth 0, depth over the maximum, an index outside the tree.
    let mut b = vec![0u8; 67 + 32];
    b[64] = 0;
    assert!(VersionSignature::from_bytes(&b).is_none());
    b[64] = 1;
    b[65] = 2;
    assert!(VersionSignature::from_bytes(&b).is_none());
    b[65] = 1;
    assert!(VersionSignature::from_bytes(&b).is_some());
}

#[test]
fn batch_signatures_survive_the_wire_and_feedsync_xml() {
    let r = written(5);
    for item in r.items() {
        let back = wire::from_wire(&wire::to_wire(item)).unwrap();
        assert_eq!(back.version.signature, item.version.signature);
        verify_version(&back.version, &SCOPE).unwrap();
    }
    let mut feed = Feed::new(Dialect::Rss);
    for item in r.items() {
        feed.put((**item).clone()).unwrap();
    }
    let text = xml::write_feed(&feed);
    let read = xml::read_feed(text.as_bytes()).unwrap();
    for item in r.items() {
        let again = read.item(item.id()).unwrap();
        assert_eq!(again.version.signature, item.version.signature);
        verify_version(&again.version, &SCOPE).unwrap();
    }
}

#[test]
fn a_bulk_write_is_the_same_as_writing_one_by_one() {
    // A repeated id sees its earlier change; the result equals sequential signed changes, but
    // for the signatures.
    let id = ItemId::new("again").unwrap();
    let batch = vec![
        (id.clone(), edit("one")),
        (ItemId::new("other").unwrap(), edit("x")),
        (id.clone(), edit("two")),
    ];
    let mut many = Replica::new_signed(1, SCOPE);
    assert_eq!(many.change_signed_many(&key(1), &when(), &batch).unwrap(), 3);
    let mut one = Replica::new_signed(1, SCOPE);
    for (id, e) in &batch {
        one.change_signed(id, &key(1), &when(), e).unwrap();
    }
    assert_eq!(many.digest(), one.digest());
    assert_eq!(many.item(&id).unwrap().version.updates, 2);
    for item in many.items() {
        verify_version(&item.version, &SCOPE).unwrap();
    }
    // An error keeps what came before it.
    let mut r = Replica::new_signed(1, SCOPE);
    let list = vec![
        (ItemId::new("a").unwrap(), edit("<title>a</title>")),
        (ItemId::new("b").unwrap(), edit("<title>\u{1}</title>")),
        (ItemId::new("c").unwrap(), edit("<title>c</title>")),
    ];
    let (made, err) = r.change_signed_many(&key(1), &when(), &list).unwrap_err();
    assert_eq!(made, 1, "{err}");
    assert!(matches!(err, engine::feedsync::FeedsyncError::Content { .. }), "{err}");
    assert!(r.item(&ItemId::new("a").unwrap()).is_some());
    assert_eq!(r.len(), 1);
    verify_version(&r.item(&ItemId::new("a").unwrap()).unwrap().version, &SCOPE).unwrap();
}

#[test]
fn a_restored_replica_is_the_merged_one() {
    // `restore` (a node's own store, loaded in bulk without verifying) gives the replica that
    // merging the same items one by one gives: items, log order, digest, index, invariants.
    let source = written(100);
    let stored: Vec<Arc<Item>> = source.items().cloned().collect();
    let mut restored = Replica::new_signed(7, SCOPE);
    assert_eq!(restored.restore(stored.clone(), 2).unwrap(), 100);
    let mut merged = Replica::new_signed(7, SCOPE);
    for item in &stored {
        merged.merge(item).unwrap();
    }
    restored.check_invariants().unwrap();
    assert_eq!(restored.digest(), merged.digest());
    assert_eq!(restored.head(), merged.head());
    let log = |r: &Replica| {
        r.log_since(Default::default()).map(|c| (c.seq, c.item.id().clone(), c.fp)).collect::<Vec<_>>()
    };
    assert_eq!(log(&restored), log(&merged));
    // Not sorted, or into a replica that holds items: merged one by one, the same outcome.
    let mut reversed = Replica::new_signed(7, SCOPE);
    assert_eq!(reversed.restore(stored.iter().rev().cloned(), 1).unwrap(), 100);
    reversed.check_invariants().unwrap();
    assert_eq!(reversed.digest(), merged.digest());
    assert_eq!(restored.restore(stored.clone(), 1).unwrap(), 0, "nothing new");
    restored.check_invariants().unwrap();
}

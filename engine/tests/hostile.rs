//! Hostile input never panics: arbitrary bytes, and mutations of a valid feed, through the
//! reader; whatever is accepted round-trips through the writer. (The coverage-guided fuzz target
//! in `fuzz/` does the same for longer runs.)

use engine::feedsync::xml;
use proptest::prelude::*;

const SEED: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:sx="http://feedsync.org/2007/feedsync"><channel><title>t</title>
<sx:sharing since="1" until="2"><sx:related link="http://x/" type="aggregated"/></sx:sharing>
<item><title>a &amp; b</title><sx:sync id="x" updates="2"><sx:history sequence="2" when="2008-01-01T00:00:00Z" by="a"/>
<sx:conflicts><item><sx:sync id="x" updates="1"><sx:history sequence="1" by="b"/></sx:sync><title>c</title></item></sx:conflicts>
</sx:sync></item></channel></rss>"#;

fn check(bytes: &[u8]) {
    if let Ok(feed) = xml::read_feed(bytes) {
        feed.check_invariants().expect("accepted feeds hold the invariants");
        let written = xml::write_feed(&feed);
        let again = xml::read_feed(written.as_bytes()).expect("what we write we can read");
        assert_eq!(xml::write_feed(&again), written, "writing is stable");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes);
    }

    #[test]
    fn mutated_feeds_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
    ) {
        let mut bytes = SEED.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => {}
            }
        }
        check(&bytes);
    }
}

#[test]
fn the_seed_is_valid() {
    check(SEED.as_bytes());
    assert!(xml::read_feed(SEED.as_bytes()).is_ok());
}

/// Inputs the fuzzer once crashed on (`fuzz/`): every file in `tests/fuzz-regressions/`.
#[test]
fn fuzz_regressions() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("regressions folder") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("readable");
        check(&bytes);
        seen += 1;
    }
    assert!(seen > 0);
}

#[test]
fn characters_xml_forbids_are_refused() {
    for bad in ["<rss>\u{0}</rss>", "<rss>\u{b}</rss>", "<rss>\u{ffff}</rss>"] {
        let err = xml::read_feed(bad.as_bytes()).unwrap_err();
        assert!(err.problems[0].to_string().contains("is not allowed in XML"), "{bad:?}: {err}");
    }
    // Tab, LF and CR are fine; a form feed in channel text is not XML white space.
    check(b"<rss version=\"2.0\"><channel>\t\r\n<title>t</title></channel></rss>");
}

/// Issue 11, defect 4: content that would break a feed, or close its entry and smuggle in
/// another, is refused where it enters: a local change, an item from the wire, a posted feed.
#[test]
fn content_that_would_break_a_feed_is_refused_where_it_enters() {
    use std::sync::Arc;

    use engine::feedsync::{Content, Edit, Endpoint, FeedsyncError, ItemId, When};
    use engine::replica::Replica;
    use engine::wire::{from_wire, to_wire, WireError};

    let id = ItemId::new("x").unwrap();
    let by = Endpoint::new("a").unwrap();
    let when = When::from_unix_secs(1_700_000_000).unwrap();
    let with = |inner: &str| Edit {
        content: Some(Arc::new(Content { inner: inner.into(), ..Content::empty() })),
        ..Edit::default()
    };
    // A local change (what `put` and the local API do).
    let mut r = Replica::new(1);
    for bad in ["<title>\u{1}</title>", "<title>\u{1b}[2J</title>", "<title>a</title></item><item>"] {
        let err = r.change(&id, &by, &when, &with(bad)).unwrap_err();
        assert!(matches!(err, FeedsyncError::Content { .. }), "{bad:?}: {err}");
    }
    assert!(r.is_empty());
    // The wire: a valid item whose content a peer replaced.
    r.change(&id, &by, &when, &with("<title>fine</title>")).unwrap();
    let mut wire = to_wire(r.item(&id).unwrap());
    assert!(from_wire(&wire).is_ok());
    wire.version.inner = "<title>a</title></entry><entry><title>forged</title>".into();
    let err = from_wire(&wire).unwrap_err();
    assert!(matches!(&err, WireError::Item(e) if e.contains("content refused")), "{err}");
    // A posted feed: an undeclared entity is not well-formed XML.
    let feed = SEED.replace("a &amp; b", "a &mp; b");
    let err = xml::read_feed(feed.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("item content"), "{err}");
}

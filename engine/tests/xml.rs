//! FeedSync XML through the public API: round trips keep unknown content, merges keep it too,
//! and every kind of bad input gets its typed problem at the right line. Expectations are
//! blessed with `UPDATE_EXPECT=1`.

use engine::feedsync::{self, xml, Dialect, Edit, Endpoint, ItemId, When};
use expect_test::{expect, Expect};

const RSS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:sx="http://feedsync.org/2007/feedsync" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <channel custom="1">
    <title>Tasks</title>
    <link>http://example.com/tasks</link>
    <description>Things to do</description>
    <x:unknown xmlns:x="urn:x">kept <b>as is</b></x:unknown>
    <sx:sharing since="a" until="b" expires="2030-01-01T00:00:00Z">
      <sx:related link="http://example.com/all.xml" type="complete" title="All"/>
    </sx:sharing>
    <item rdf-like="yes">
      <title>Buy milk &amp; eggs</title>
      <dc:creator>alice</dc:creator>
      <sx:sync id="item_1" updates="2">
        <sx:history sequence="2" when="2005-05-21T09:43:33.25+02:00" by="REO1750"/>
        <sx:history sequence="1" by="REO1750"/>
      </sx:sync>
      <![CDATA[raw <text>]]>
    </item>
    <item><title>Not synced</title></item>
  </channel>
</rss>
"#;

const ATOM: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:sx="http://feedsync.org/2007/feedsync">
  <title>Tasks</title>
  <id>urn:uuid:60a76c80-d399-11d9-b93C-0003939e0af6</id>
  <updated>2005-05-21T09:43:33Z</updated>
  <entry>
    <title>Buy milk</title>
    <id>urn:uuid:1225c695-cfb8-4ebb-aaaa-80da344efa6a</id>
    <updated>2005-05-21T09:43:33Z</updated>
    <sx:sync id="item_1" updates="1" noconflicts="true">
      <sx:history sequence="1" when="2005-05-21T09:43:33Z" by="REO1750"/>
    </sx:sync>
  </entry>
</feed>
"#;

#[test]
fn rss_round_trip_keeps_everything() {
    let feed = xml::read_feed(RSS.as_bytes()).expect("valid");
    assert_eq!(feed.dialect, Dialect::Rss);
    assert_eq!(feed.len(), 1);
    assert_eq!(feed.plain.len(), 1);
    let written = xml::write_feed(&feed);
    // Reading what we wrote gives the same feed, and writing it again the same bytes.
    let again = xml::read_feed(written.as_bytes()).expect("our output is valid");
    assert_eq!(xml::write_feed(&again), written);
    for kept in [
        "custom=\"1\"",
        "<x:unknown xmlns:x=\"urn:x\">kept <b>as is</b></x:unknown>",
        "rdf-like=\"yes\"",
        "<dc:creator>alice</dc:creator>",
        "Buy milk &amp; eggs",
        "<![CDATA[raw <text>]]>",
        "when=\"2005-05-21T09:43:33.25+02:00\"",
        "<sx:history sequence=\"1\" by=\"REO1750\"/>",
        "<item><title>Not synced</title></item>",
        "<sx:related link=\"http://example.com/all.xml\" type=\"complete\" title=\"All\"/>",
    ] {
        assert!(written.contains(kept), "lost {kept:?} in\n{written}");
    }
}

#[test]
fn atom_round_trip_and_flags() {
    let feed = xml::read_feed(ATOM.as_bytes()).expect("valid");
    assert_eq!(feed.dialect, Dialect::Atom);
    let item = feed.item(&ItemId::new("item_1").unwrap()).unwrap();
    assert!(item.version.noconflicts);
    let written = xml::write_feed(&feed);
    assert!(written.contains("<feed xmlns=\"http://www.w3.org/2005/Atom\""));
    assert!(written.contains("noconflicts=\"true\""));
    assert!(written.contains("<id>urn:uuid:1225c695-cfb8-4ebb-aaaa-80da344efa6a</id>"));
    let again = xml::read_feed(written.as_bytes()).unwrap();
    assert_eq!(xml::write_feed(&again), written);
}

#[test]
fn merge_keeps_unknown_content_of_both_sides() {
    let local = xml::read_feed(RSS.as_bytes()).unwrap();
    let mut theirs = local.clone();
    let id = ItemId::new("item_1").unwrap();
    let by = Endpoint::new("other").unwrap();
    let when = When::parse("2006-01-01T00:00:00Z").unwrap();
    theirs.change(&id, &by, &when, &Edit::default()).unwrap();
    let new_id = ItemId::new("item_2").unwrap();
    theirs.change(&new_id, &by, &when, &Edit::default()).unwrap();
    let mut merged = local.clone();
    let stats = feedsync::merge_feed(&mut merged, &theirs).unwrap();
    assert_eq!((stats.added, stats.changed), (1, 1));
    let written = xml::write_feed(&merged);
    assert!(written.contains("<dc:creator>alice</dc:creator>"));
    assert!(written.contains("<x:unknown xmlns:x=\"urn:x\">"));
    assert!(written.contains("updates=\"3\""));
}

#[test]
fn merging_rss_into_atom_is_refused() {
    let mut atom = xml::read_feed(ATOM.as_bytes()).unwrap();
    let rss = xml::read_feed(RSS.as_bytes()).unwrap();
    let before = xml::write_feed(&atom);
    let err = feedsync::merge_feed(&mut atom, &rss).unwrap_err();
    assert_eq!(err.to_string(), "cannot merge a RSS feed into a Atom feed");
    assert_eq!(xml::write_feed(&atom), before, "nothing changed");
}

/// Problems as `line: message` lines.
fn check(input: &str, expect: Expect) {
    let got = match xml::read_feed(input.as_bytes()) {
        Ok(_) => "ok".to_string(),
        Err(err) => {
            err.problems.iter().map(|p| format!("{}: {}", p.line, p.kind)).collect::<Vec<_>>().join("\n")
        }
    };
    expect.assert_eq(&got);
}

fn rss_items(items: &str) -> String {
    format!(
        "<rss version=\"2.0\" xmlns:sx=\"http://feedsync.org/2007/feedsync\">\n<channel>\n<title>t</title>\n{items}\n</channel>\n</rss>\n"
    )
}

#[test]
fn bad_input_gets_typed_problems_with_lines() {
    check(
        "<rss><channel></rss>",
        expect![[r#"1: malformed XML: ill-formed document: expected `</channel>`, but `</rss>` was found"#]],
    );
    check("", expect![[r#"1: not an RSS 2.0 or Atom feed: no root element"#]]);
    check("<html/>", expect![[r#"1: not an RSS 2.0 or Atom feed: an empty root element"#]]);
    check(
        "<rdf:RDF xmlns:rdf=\"urn:r\"></rdf:RDF>",
        expect![[r#"1: not an RSS 2.0 or Atom feed: root element <rdf:RDF>"#]],
    );
    check("\u{feff}<rss version=\"2.0\"><channel/></rss>", expect!["1: <rss> without <channel>"]);
    check(
        &rss_items("<item><sx:sync updates=\"1\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>"),
        expect![[r#"4: sx:sync without id"#]],
    );
    check(
        &rss_items(
            "<item><sx:sync id=\"x\" updates=\"1\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>\n<item><sx:sync id=\"x\" updates=\"1\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>",
        ),
        expect![[r#"5: duplicate sync id "x""#]],
    );
    check(
        &rss_items(
            "<item><sx:sync id=\"x\" updates=\"0\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>",
        ),
        expect![[r#"4: updates "0" is not an integer >= 1"#]],
    );
    check(
        &rss_items(
            "<item><sx:sync id=\"x\" updates=\"one\"><sx:history sequence=\"-1\" by=\"a\"/></sx:sync></item>",
        ),
        expect![[r#"
            4: updates "one" is not an integer >= 1
            4: sequence "-1" is not an integer >= 1"#]],
    );
    check(
        &rss_items("<item><sx:sync id=\"x\" updates=\"1\"><sx:history sequence=\"1\"/></sx:sync></item>"),
        expect!["4: sx:history with neither when nor by"],
    );
    check(
        &rss_items("<item><sx:sync id=\"x\" updates=\"1\"><sx:history sequence=\"1\" when=\"yesterday\"/></sx:sync></item>"),
        expect![[r#"4: when "yesterday" is not an RFC 3339 date-time"#]],
    );
    check(
        &rss_items("<item><sx:sync id=\"x\" updates=\"1\"></sx:sync></item>"),
        expect![[r#"4: sx:sync without sx:history"#]],
    );
    check(
        &rss_items("<item><sx:sync id=\"bad id\" updates=\"1\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>"),
        expect![[r#"4: sync id "bad id" has a character outside RFC 2141 NSS at byte 3"#]],
    );
    check(
        &rss_items(
            "<item><sx:sync id=\"x\" updates=\"2\"><sx:history sequence=\"2\" by=\"a\"/>\n<sx:conflicts><item><sx:sync id=\"x\" updates=\"1\"><sx:history sequence=\"1\" by=\"b\"/>\n<sx:conflicts/></sx:sync></item></sx:conflicts></sx:sync></item>",
        ),
        expect![[r#"6: nested sx:conflicts"#]],
    );
    check(
        &rss_items(
            "<item><sx:sync id=\"x\" updates=\"2\"><sx:history sequence=\"2\" by=\"a\"/><sx:conflicts><item><sx:sync id=\"y\" updates=\"1\"><sx:history sequence=\"1\" by=\"b\"/></sx:sync></item></sx:conflicts></sx:sync></item>",
        ),
        expect![[r#"4: a conflict of item "x" has another sync id"#]],
    );
    check(
        "<rss version=\"2.0\" xmlns:sx=\"http://feedsync.org/2007/feedsync\"><channel>\n<sx:sharing since=\"1\"><sx:related link=\"relative.xml\" type=\"complete\"/><sx:related link=\"http://x/\" type=\"partial\"/></sx:sharing></channel></rss>",
        expect![[r#"
            2: sx:sharing with only one of since and until
            2: sx:related link "relative.xml" is not an absolute URI
            2: sx:related type "partial" is neither complete nor aggregated"#]],
    );
    check(
        &rss_items("<item><sx:sync id=\"x\" updates=\"1\" deleted=\"maybe\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>"),
        expect![[r#"4: deleted "maybe" is not a boolean"#]],
    );
    check(
        "<!DOCTYPE rss [<!ENTITY x \"y\">]><rss/>",
        expect![[r#"1: document type declarations are not accepted"#]],
    );
    check(
        "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><rss/>",
        expect![[r#"1: unsupported encoding "iso-8859-1" (only UTF-8)"#]],
    );
    check("<rss version=\"2.0\"><channel/></rss><rss/>", expect!["1: <rss> without <channel>"]);
}

#[test]
fn oversize_input_is_refused_before_parsing() {
    let big = vec![b' '; feedsync::limits::FEED_BYTES_MAX + 1];
    let err = xml::read_feed(&big).unwrap_err();
    assert_eq!(
        err.problems[0].to_string(),
        format!("line 1: document is {} bytes (at most {})", big.len(), big.len() - 1)
    );
}

#[test]
fn not_utf8_is_refused() {
    let err = xml::read_feed(b"<rss>\xff</rss>").unwrap_err();
    assert_eq!(err.problems[0].kind, xml::ProblemKind::NotUtf8);
}

#[test]
fn a_feed_read_from_another_implementation_is_normalised() {
    // Conflicts listed worst-first, and a conflict equal to the winner: normalised on read.
    let doc = rss_items(
        "<item><sx:sync id=\"x\" updates=\"2\"><sx:history sequence=\"2\" by=\"a\"/><sx:conflicts>\
         <item><sx:sync id=\"x\" updates=\"2\"><sx:history sequence=\"2\" by=\"a\"/></sx:sync></item>\
         <item><sx:sync id=\"x\" updates=\"1\"><sx:history sequence=\"1\" by=\"c\"/></sx:sync></item>\
         <item><sx:sync id=\"x\" updates=\"2\"><sx:history sequence=\"2\" by=\"b\"/></sx:sync></item>\
         </sx:conflicts></sx:sync></item>",
    );
    let feed = xml::read_feed(doc.as_bytes()).unwrap();
    feed.check_invariants().unwrap();
    let item = feed.item(&ItemId::new("x").unwrap()).unwrap();
    let tops: Vec<String> =
        item.conflicts.iter().map(|c| c.topmost().by.as_ref().unwrap().to_string()).collect();
    assert_eq!(item.version.topmost().by.as_ref().unwrap().as_str(), "b");
    assert_eq!(tops, ["a", "c"]);
}

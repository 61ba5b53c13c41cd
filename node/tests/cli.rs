//! The `feedmesh feedsync` command-line contract, driven as a user (or a conformance suite) would:
//! RSS and Atom alike, the exit statuses (0 ok, 1 invalid input, 2 usage) and the messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RSS: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<rss version="2.0" xmlns:sx="http://feedsync.org/2007/feedsync">
  <channel>
    <title>Tasks</title>
    <link>http://example.com/</link>
    <description>d</description>
    <item>
      <title>Buy milk</title>
      <custom>kept</custom>
      <sx:sync id="item_1" updates="1">
        <sx:history sequence="1" when="2008-01-01T00:00:00Z" by="alpha"/>
      </sx:sync>
    </item>
  </channel>
</rss>
"#;

const ATOM: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:sx="http://feedsync.org/2007/feedsync">
  <title>Tasks</title>
  <id>urn:feed</id>
  <updated>2008-01-01T00:00:00Z</updated>
  <entry>
    <title>Buy milk</title>
    <id>urn:e1</id>
    <updated>2008-01-01T00:00:00Z</updated>
    <custom xmlns="urn:custom">kept</custom>
    <sx:sync id="item_1" updates="1">
      <sx:history sequence="1" when="2008-01-01T00:00:00Z" by="alpha"/>
    </sx:sync>
  </entry>
</feed>
"#;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("temp dir"))
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).expect("write fixture");
        path
    }
}

fn feedmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_feedmesh")).args(args).output().expect("run feedmesh")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("utf-8 output")
}

/// Runs `update` and returns the new feed text (asserting success).
fn update(dir: &Dir, name: &str, feed: &str, extra: &[&str]) -> PathBuf {
    let input = dir.file(&format!("{name}.in.xml"), feed);
    let mut args = vec!["feedsync", "update", path(&input)];
    args.extend_from_slice(extra);
    let out = feedmesh(&args);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    dir.file(&format!("{name}.xml"), &stdout(&out))
}

#[test]
fn update_merge_resolve_purge_rss_and_atom() {
    for (dialect, base) in [("rss", RSS), ("atom", ATOM)] {
        let dir = Dir::new();
        let a = update(
            &dir,
            "a",
            base,
            &["--id", "item_1", "--by", "beta", "--when", "2008-01-02T00:00:00Z", "--title", "Buy bread"],
        );
        let b =
            update(&dir, "b", base, &["--id", "item_1", "--by", "gamma", "--when", "2008-01-03T00:00:00Z"]);
        let b = update(
            &dir,
            "b2",
            &std::fs::read_to_string(&b).unwrap(),
            &["--id", "item_2", "--by", "gamma", "--when", "2008-01-03T00:00:01Z", "--title", "New"],
        );

        // Merge both ways: same items, a conflict kept, unknown content kept, in LOCAL's dialect.
        let ab = feedmesh(&["feedsync", "merge", path(&a), path(&b)]);
        let ba = feedmesh(&["feedsync", "merge", path(&b), path(&a)]);
        assert_eq!(ab.status.code(), Some(0), "{dialect}: {}", stderr(&ab));
        assert_eq!(ba.status.code(), Some(0), "{dialect}: {}", stderr(&ba));
        let merged = stdout(&ab);
        assert!(merged.contains("<sx:conflicts>"), "{dialect}: {merged}");
        assert!(merged.contains("id=\"item_2\""), "{dialect}: items only INCOMING has are kept");
        assert!(merged.contains(">kept</custom>"), "{dialect}: unknown elements survive");
        // gamma's edit is later: it wins; beta's is kept as a conflict.
        let top = merged.find("by=\"gamma\"").unwrap();
        let conflict = merged.find("by=\"beta\"").unwrap();
        assert!(top < conflict, "{dialect}: the winner comes first");
        let d = Dir::new();
        let m1 = d.file("m1.xml", &merged);
        let m2 = d.file("m2.xml", &stdout(&ba));
        // Merging the two results changes neither (same state, whichever side was local).
        let again = feedmesh(&["feedsync", "merge", path(&m1), path(&m2)]);
        assert_eq!(stdout(&again), merged, "{dialect}: merge(ab, ba) == ab");

        // Resolve: one version, no conflicts, history folded.
        let resolved = update(
            &d,
            "r",
            &merged,
            &["--id", "item_1", "--by", "alpha", "--when", "2008-01-04T00:00:00Z", "--resolve"],
        );
        let text = std::fs::read_to_string(&resolved).unwrap();
        assert!(!text.contains("<sx:conflicts>"), "{dialect}: {text}");
        assert!(text.contains("updates=\"3\""), "{dialect}: {text}");
        assert!(text.contains("by=\"beta\"") && text.contains("by=\"gamma\""), "{dialect}: folded history");

        // Delete makes a tombstone; purge keeps the newest entry per endpoint.
        let deleted = update(
            &d,
            "del",
            &text,
            &["--id", "item_1", "--by", "alpha", "--when", "2008-01-05T00:00:00Z", "--delete"],
        );
        let deleted_text = std::fs::read_to_string(&deleted).unwrap();
        assert!(deleted_text.contains("deleted=\"true\""), "{dialect}");
        let purged = feedmesh(&["feedsync", "purge", path(&deleted)]);
        assert_eq!(purged.status.code(), Some(0));
        let purged = stdout(&purged);
        assert_eq!(purged.matches("by=\"alpha\"").count(), 1, "{dialect}: {purged}");
        assert!(
            purged.contains("sequence=\"4\" when=\"2008-01-05T00:00:00Z\" by=\"alpha\""),
            "{dialect}: {purged}"
        );

        let ok = feedmesh(&["feedsync", "validate", path(&d.file("p.xml", &purged))]);
        assert_eq!((ok.status.code(), stdout(&ok)), (Some(0), "ok\n".to_string()), "{dialect}");
    }
}

#[test]
fn created_items_are_valid_in_their_dialect() {
    let dir = Dir::new();
    let atom =
        update(&dir, "atom", ATOM, &["--id", "new", "--by", "me", "--when", "2009-02-03T04:05:06.789+01:00"]);
    let text = std::fs::read_to_string(&atom).unwrap();
    // Atom entries need title, id and updated; our own `when` is written in whole seconds, UTC.
    assert!(
        text.contains("<title></title><id>urn:feedsync:new</id><updated>2009-02-03T03:05:06Z</updated>"),
        "{text}"
    );
    assert!(text.contains("sequence=\"1\" when=\"2009-02-03T03:05:06Z\" by=\"me\""), "{text}");
    let rss = update(&dir, "rss", RSS, &["--id", "new", "--by", "me"]);
    let text = std::fs::read_to_string(&rss).unwrap();
    assert!(text.contains("<title>new</title>"), "{text}");
    assert!(text.contains("Z\" by=\"me\""), "without --when, now (UTC, whole seconds)");
}

#[test]
fn dialect_mismatch_is_refused_with_exit_1() {
    let dir = Dir::new();
    let (rss, atom) = (dir.file("r.xml", RSS), dir.file("a.xml", ATOM));
    let out = feedmesh(&["feedsync", "merge", path(&rss), path(&atom)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("a.xml") && err.contains("cannot merge a Atom feed into a RSS feed"), "{err}");
}

#[test]
fn invalid_input_exits_1_naming_file_and_problem() {
    let dir = Dir::new();
    let bad = dir.file("bad.xml", "<rss version=\"2.0\" xmlns:sx=\"http://feedsync.org/2007/feedsync\"><channel>\n<item><sx:sync id=\"x\" updates=\"0\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>\n<item><sx:sync updates=\"1\"><sx:history sequence=\"1\" by=\"a\"/></sx:sync></item>\n</channel></rss>");
    let good = dir.file("good.xml", RSS);
    for args in [
        vec!["feedsync", "merge", path(&good), path(&bad)],
        vec!["feedsync", "merge", path(&bad), path(&good)],
        vec!["feedsync", "purge", path(&bad)],
        vec!["feedsync", "update", path(&bad), "--id", "a", "--by", "b"],
    ] {
        let out = feedmesh(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("bad.xml:2: updates \"0\" is not an integer >= 1"), "{err}");
    }
    let out = feedmesh(&["feedsync", "validate", path(&bad)]);
    assert_eq!(out.status.code(), Some(1));
    let expected =
        format!("{0}:2: updates \"0\" is not an integer >= 1\n{0}:3: sx:sync without id\n", path(&bad));
    assert_eq!(stdout(&out), expected);

    let missing = dir.0.path().join("missing.xml");
    for command in ["validate", "purge"] {
        let out = feedmesh(&["feedsync", command, path(&missing)]);
        assert_eq!(out.status.code(), Some(1));
        let text = stdout(&out) + &stderr(&out);
        assert!(text.contains("missing.xml") && text.contains("cannot open"), "{text}");
    }
    let garbage = dir.file("garbage.xml", "\u{0}\u{1}not xml at all <<<");
    let out = feedmesh(&["feedsync", "merge", path(&garbage), path(&good)]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2() {
    let dir = Dir::new();
    let good = dir.file("good.xml", RSS);
    for args in [
        vec!["feedsync"],
        vec!["feedsync", "merge", path(&good)],
        vec!["feedsync", "update", path(&good), "--by", "b"],
        vec!["feedsync", "update", path(&good), "--id", "has space", "--by", "b"],
        vec!["feedsync", "update", path(&good), "--id", "a", "--by", "b", "--when", "tomorrow"],
        vec!["feedsync", "frobnicate"],
    ] {
        let out = feedmesh(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

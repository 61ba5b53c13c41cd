//! Checks of the feeds the programs write (issue 13), by parsers no one here wrote (the
//! `feed-rs` crate; Python's `feedparser`, installed here when missing) and by RFC 4287's rules
//! asserted directly over the XML tree.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use quick_xml::events::Event;
use quick_xml::name::ResolveResult;
use time::format_description::well_known::Rfc3339;

pub const ATOM: &str = "http://www.w3.org/2005/Atom";
pub const SX: &str = "http://feedsync.org/2007/feedsync";
pub const CONTENT: &str = "http://purl.org/rss/1.0/modules/content/";

/// An element of a parsed document: namespace, local name, attributes, text, children.
#[derive(Debug, Clone, Default)]
pub struct El {
    pub ns: String,
    pub name: String,
    pub attrs: BTreeMap<String, String>,
    pub text: String,
    pub kids: Vec<El>,
}

impl El {
    pub fn all<'a>(&'a self, ns: &'a str, name: &'a str) -> impl Iterator<Item = &'a El> + 'a {
        self.kids.iter().filter(move |k| k.ns == ns && k.name == name)
    }
    pub fn one<'a>(&'a self, ns: &'a str, name: &'a str) -> &'a El {
        let found: Vec<&El> = self.all(ns, name).collect();
        assert_eq!(found.len(), 1, "exactly one {{{ns}}}{name} in <{}>, found {}", self.name, found.len());
        found[0]
    }
}

/// Parses a whole document into a tree, namespace-aware.
pub fn tree(text: &str) -> El {
    let mut reader = quick_xml::NsReader::from_str(text);
    let mut stack: Vec<El> = vec![El::default()];
    loop {
        let (ns, event) = reader.read_resolved_event().expect("well-formed XML");
        let ns = match ns {
            ResolveResult::Bound(n) => n.as_ref().to_string(),
            _ => String::new(),
        };
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let mut el = El { ns, name: e.local_name().as_ref().to_string(), ..El::default() };
                for a in e.attributes() {
                    let a = a.expect("attribute");
                    let key = a.key.as_ref().to_string();
                    el.attrs.insert(
                        key,
                        a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                            .expect("attribute value")
                            .into_owned(),
                    );
                }
                if matches!(event, Event::Start(_)) {
                    stack.push(el);
                } else {
                    stack.last_mut().unwrap().kids.push(el);
                }
            }
            Event::End(_) => {
                let el = stack.pop().unwrap();
                stack.last_mut().unwrap().kids.push(el);
            }
            Event::Text(t) => {
                let text = t.xml_content(quick_xml::XmlVersion::Implicit1_0).into_owned();
                stack.last_mut().unwrap().text.push_str(&text);
            }
            Event::GeneralRef(r) => {
                if let Some(c) = r.resolve_char_ref().expect("character reference") {
                    stack.last_mut().unwrap().text.push(c);
                    continue;
                }
                let name = r.xml_content(quick_xml::XmlVersion::Implicit1_0).into_owned();
                let c = match name.as_str() {
                    "amp" => "&",
                    "lt" => "<",
                    "gt" => ">",
                    "quot" => "\"",
                    "apos" => "'",
                    other => panic!("undeclared entity {other}"),
                };
                stack.last_mut().unwrap().text.push_str(c);
            }
            Event::CData(t) => {
                stack.last_mut().unwrap().text.push_str(&t.xml_content(quick_xml::XmlVersion::Implicit1_0))
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(stack.len(), 1, "unbalanced document");
    let mut root = stack.pop().unwrap();
    assert_eq!(root.kids.len(), 1, "one root element");
    root.kids.pop().unwrap()
}

/// An absolute IRI: a scheme (RFC 3986: a letter, then letters, digits, `+-.`), a colon, more,
/// and no whitespace.
pub fn is_absolute_iri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else { return false };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !s.chars().any(char::is_whitespace)
}

/// An RFC 3339 date-time that is not in 1970; its unix seconds.
pub fn date(s: &str) -> i64 {
    let t = time::OffsetDateTime::parse(s.trim(), &Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"));
    assert_ne!(t.year(), 1970, "a 1970 date: {s}");
    t.unix_timestamp()
}

/// The newest `when` of an `sx:sync` (its own history, not its conflicts').
fn newest_when(sync: &El) -> Option<i64> {
    sync.all(SX, "history").filter_map(|h| h.attrs.get("when")).map(|w| date(w)).max()
}

/// RFC 4287's rules over an Atom document; returns the entries' FeedSync ids.
pub fn check_atom(text: &str, served_at: Option<&str>) -> Vec<String> {
    let feed = tree(text);
    assert_eq!((feed.ns.as_str(), feed.name.as_str()), (ATOM, "feed"), "the root is atom:feed");
    let id = &feed.one(ATOM, "id").text;
    assert!(id.starts_with("urn:"), "a stable urn: feed id, not {id:?}");
    assert!(is_absolute_iri(id), "feed id {id:?}");
    assert!(!feed.one(ATOM, "title").text.trim().is_empty(), "a feed title");
    let feed_updated = date(&feed.one(ATOM, "updated").text);
    let authors: Vec<&El> = feed.all(ATOM, "author").collect();
    assert!(!authors.is_empty(), "a feed author (so entries need none)");
    for a in authors {
        assert!(!a.one(ATOM, "name").text.is_empty());
    }
    if let Some(url) = served_at {
        let selfs: Vec<&El> = feed
            .all(ATOM, "link")
            .filter(|l| l.attrs.get("rel").map(String::as_str) == Some("self"))
            .collect();
        assert_eq!(selfs.len(), 1, "one link rel=self");
        assert_eq!(selfs[0].attrs["href"], url);
        assert!(is_absolute_iri(&selfs[0].attrs["href"]));
    }
    let mut newest = None;
    let mut ids = Vec::new();
    let mut entry_ids = std::collections::BTreeSet::new();
    for entry in feed.all(ATOM, "entry") {
        let eid = &entry.one(ATOM, "id").text;
        assert!(is_absolute_iri(eid), "entry id {eid:?}");
        assert!(entry_ids.insert(eid.clone()), "entry ids are unique: {eid}");
        entry.one(ATOM, "title");
        let updated = date(&entry.one(ATOM, "updated").text);
        assert!(
            entry.all(ATOM, "content").count() == 1
                || entry
                    .all(ATOM, "link")
                    .any(|l| l.attrs.get("rel").map(String::as_str) == Some("alternate")),
            "an entry has content or an alternate link (RFC 4287 4.1.2)"
        );
        // FeedSync stays: sx:sync is the entry's first child.
        let sync = &entry.kids[0];
        assert_eq!((sync.ns.as_str(), sync.name.as_str()), (SX, "sync"), "sx:sync first");
        if let Some(when) = newest_when(sync) {
            assert_eq!(updated, when, "an entry's updated is its newest history when");
        }
        newest = newest.max(Some(updated));
        ids.push(sync.attrs["id"].clone());
    }
    if let Some(n) = newest {
        assert_eq!(feed_updated, n, "the feed's updated is its newest entry's");
    }
    ids
}

/// RSS 2.0's rules (and the issue's: guid, description, content in the content module);
/// returns the items' FeedSync ids.
pub fn check_rss(text: &str) -> Vec<String> {
    let rss = tree(text);
    assert_eq!(rss.name, "rss");
    assert_eq!(rss.attrs["version"], "2.0");
    let channel = rss.one("", "channel");
    for required in ["title", "link", "description"] {
        assert!(!channel.one("", required).text.trim().is_empty(), "channel {required}");
    }
    let mut ids = Vec::new();
    for item in channel.all("", "item") {
        let guid = item.one("", "guid");
        assert!(is_absolute_iri(&guid.text), "guid {:?}", guid.text);
        item.one("", "description");
        assert_eq!(item.all("", "content").count(), 0, "no bare <content> in RSS");
        if let Some(p) = item.all("", "pubDate").next() {
            time::OffsetDateTime::parse(&p.text, &time::format_description::well_known::Rfc2822)
                .unwrap_or_else(|e| panic!("pubDate {:?}: {e}", p.text));
        }
        let sync = &item.kids[0];
        assert_eq!((sync.ns.as_str(), sync.name.as_str()), (SX, "sync"), "sx:sync first");
        ids.push(sync.attrs["id"].clone());
    }
    ids
}

/// JSON Feed 1.1's rules; returns the items' FeedSync ids.
pub fn check_json_feed(text: &str, served_at: Option<&str>) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(text).expect("JSON");
    assert_eq!(v["version"], "https://jsonfeed.org/version/1.1");
    assert!(v["title"].as_str().is_some_and(|t| !t.is_empty()));
    if let Some(url) = served_at {
        assert_eq!(v["feed_url"], url);
    }
    let mut ids = Vec::new();
    for item in v["items"].as_array().expect("items") {
        assert!(item["id"].as_str().is_some_and(is_absolute_iri), "item id {}", item["id"]);
        assert!(item["content_text"].is_string() || item["content_html"].is_string(), "content");
        date(item["date_modified"].as_str().expect("date_modified"));
        for key in item.as_object().unwrap().keys() {
            let known = [
                "id",
                "url",
                "title",
                "content_text",
                "content_html",
                "date_modified",
                "date_published",
                "authors",
                "summary",
            ];
            assert!(
                known.contains(&key.as_str()) || key.starts_with('_'),
                "unknown key {key} (extensions start with _)"
            );
        }
        ids.push(item["_feedsync"]["id"].as_str().unwrap().to_string());
    }
    ids
}

/// feed-rs reads the document; its entries' ids and titles.
pub fn feed_rs(text: &str) -> Vec<(String, String)> {
    let feed =
        feed_rs::parser::parse(text.as_bytes()).unwrap_or_else(|e| panic!("feed-rs refuses it: {e}\n{text}"));
    assert!(!feed.id.is_empty() || feed.title.is_some(), "feed-rs sees an id or a title");
    feed.entries
        .iter()
        .map(|e| {
            if let Some(u) = e.updated {
                assert_ne!(u.format("%Y").to_string(), "1970", "feed-rs reads a 1970 date");
            }
            (e.id.clone(), e.title.as_ref().map(|t| t.content.clone()).unwrap_or_default())
        })
        .collect()
}

/// Whether Python's feedparser can be imported, installing it when it cannot (pip for this
/// user, else Debian's package). `Err` with what was tried when nothing works.
pub fn feedparser_ready() -> Result<(), String> {
    python_ready("import feedparser", "feedparser", Some("python3-feedparser"))
}

/// Whether the `jsonfeed-util` package (module `jsonfeed`, a JSON Feed 1.1 parser no one here
/// wrote) can be imported, installing it with pip for this user when it cannot (Debian does not
/// package it).
pub fn jsonfeed_ready() -> Result<(), String> {
    python_ready("import jsonfeed; jsonfeed.Feed.parse_string", "jsonfeed-util", None)
}

/// Whether `import` runs in python3, installing `pip_name` (then `apt_name`) when it does not.
fn python_ready(import: &str, pip_name: &str, apt_name: Option<&str>) -> Result<(), String> {
    let importable =
        || Command::new("python3").args(["-c", import]).output().is_ok_and(|o| o.status.success());
    if importable() {
        return Ok(());
    }
    let mut attempts: Vec<Vec<&str>> = vec![
        vec!["python3", "-m", "pip", "install", "--user", "--quiet", pip_name],
        vec!["python3", "-m", "pip", "install", "--user", "--quiet", "--break-system-packages", pip_name],
    ];
    if let Some(apt) = apt_name {
        attempts.push(vec!["apt-get", "install", "-y", "-q", apt]);
    }
    let mut tried = Vec::new();
    for a in attempts {
        let out = Command::new(a[0]).args(&a[1..]).output();
        tried.push(format!(
            "{}: {}",
            a.join(" "),
            match &out {
                Ok(o) => format!("exit {}", o.status),
                Err(e) => e.to_string(),
            }
        ));
        if importable() {
            return Ok(());
        }
    }
    Err(tried.join("; "))
}

/// `jsonfeed-util`'s view of each JSON Feed file: its title and item ids (it refuses a feed
/// without a title, an item without an id, an attachment or hub without its required fields).
pub fn jsonfeed(files: &[&Path]) -> Vec<(String, Vec<String>)> {
    let script = r#"
import json, sys, jsonfeed
out = []
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        feed = jsonfeed.Feed.parse_string(f.read())
    out.append({"title": feed.title, "ids": [i.id for i in feed.items]})
print(json.dumps(out))
"#;
    let out = Command::new("python3").arg("-c").arg(script).args(files).output().expect("python3 runs");
    assert!(out.status.success(), "jsonfeed-util: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["title"].as_str().unwrap_or_default().to_string(),
                d["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_str().unwrap_or_default().to_string())
                    .collect(),
            )
        })
        .collect()
}

/// feedparser's view of each file: (bozo, version, entry ids).
pub fn feedparser(files: &[&Path]) -> Vec<(bool, String, Vec<String>)> {
    let script = r#"
import json, sys, feedparser
out = []
for path in sys.argv[1:]:
    d = feedparser.parse(path)
    out.append({"bozo": bool(d.bozo), "why": str(d.get("bozo_exception", "")), "version": d.version,
                "ids": [e.get("id", "") for e in d.entries]})
print(json.dumps(out))
"#;
    let out = Command::new("python3").arg("-c").arg(script).args(files).output().expect("python3 runs");
    assert!(out.status.success(), "feedparser: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .zip(files)
        .map(|(d, f)| {
            assert!(!d["bozo"].as_bool().unwrap(), "feedparser: {} is bozo: {}", f.display(), d["why"]);
            (
                d["bozo"].as_bool().unwrap(),
                d["version"].as_str().unwrap_or_default().to_string(),
                d["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_str().unwrap_or_default().to_string())
                    .collect(),
            )
        })
        .collect()
}

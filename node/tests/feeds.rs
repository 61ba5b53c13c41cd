//! Every kind of feed the programs write (issue 13, item 1) is valid for readers: node `export`
//! as Atom, RSS and JSON Feed, the directory news feed in all three, and the relay's
//! `feed.atom` and `feed.json`. Each is read by feed-rs and by Python's feedparser (bozo false),
//! and checked against RFC 4287's rules (or RSS 2.0's, or JSON Feed 1.1's) by our own
//! assertions; FeedSync's `sx:sync`, conflicts and unknown content survive, and what a node or
//! the relay wrote reads back with every signature intact (`import`, the relay's POST).

mod common;

use std::path::PathBuf;

use common::feedcheck::*;
use common::*;
use serde_json::Value;

#[test]
fn every_feed_the_programs_write_is_valid_for_readers_and_keeps_feedsync() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let a = Dev::new(root.path(), "a");
    let b = Dev::new(root.path(), "b");
    a.ok(&["init", "--relay", &relay.url, "--name", "alice", "--account", "alice"]);
    b.ok(&["init", "--relay", &relay.url, "--name", "bob"]);
    let folder = a.ok(&["folder", "create", "photos"]).split_whitespace().last().unwrap().to_string();
    a.ok(&["folder", "share", "photos", "bob"]);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    b.ok(&["folder", "accept", "photos"]);
    b.ok(&["sync"]);
    a.ok(&["sync"]);
    // Text that needs escaping, an id that needs percent-encoding, an item with no title, and
    // a conflict (both write "shared" before either syncs).
    a.ok(&["put", "photos", "beach", "sand & <sea>", "--title", "Beach \"day\""]);
    a.ok(&["put", "photos", "a:b/c(d)", "odd id"]);
    a.ok(&["put", "photos", "shared", "alice's"]);
    b.ok(&["put", "photos", "shared", "bob's"]);
    // Unknown content from another program's feed: imported (written as alice's change).
    let foreign = root.path().join("foreign.xml");
    std::fs::write(
        &foreign,
        r#"<?xml version="1.0"?><rss version="2.0" xmlns:sx="http://feedsync.org/2007/feedsync"><channel><title>t</title><link>http://x.invalid/</link><description>d</description><item><sx:sync id="foreign" updates="1"><sx:history sequence="1" when="2024-05-01T10:00:00Z" by="elsewhere"/></sx:sync><title>From elsewhere</title><geo:lat xmlns:geo="http://www.w3.org/2003/01/geo/wgs84_pos#">52.5</geo:lat></item></channel></rss>"#,
    )
    .unwrap();
    a.ok(&["import", "photos", foreign.to_str().unwrap()]);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    a.ok(&["sync"]);
    let conflicts = a.ok(&["conflicts", "photos"]);
    assert!(conflicts.contains("shared (1 conflicts)"), "a conflict to carry: {conflicts}");
    let items = ["a:b/c(d)", "beach", "foreign", "shared"];

    let dir = root.path().join("docs");
    std::fs::create_dir_all(&dir).unwrap();
    let mut xml_files: Vec<PathBuf> = Vec::new();
    let save = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };

    // The node's export, in each format.
    let atom = a.ok(&["export", "photos", "--format", "atom"]);
    assert_eq!(check_atom(&atom, None), items);
    assert!(
        atom.contains("<geo:lat xmlns:geo=\"http://www.w3.org/2003/01/geo/wgs84_pos#\">52.5</geo:lat>"),
        "{atom}"
    );
    assert!(atom.contains("<sx:conflicts>"), "conflicts stay");
    xml_files.push(save("export.atom", &atom));
    let rss = a.ok(&["export", "photos", "--format", "rss"]);
    assert_eq!(check_rss(&rss), items);
    let beach = tree(&rss);
    let beach =
        beach.one("", "channel").all("", "item").find(|i| i.kids[0].attrs["id"] == "beach").unwrap().clone();
    assert_eq!(beach.one(CONTENT, "encoded").text, "sand & <sea>");
    assert_eq!(beach.one("", "description").text, "sand & <sea>");
    assert_eq!(beach.one("", "title").text, "Beach \"day\"");
    xml_files.push(save("export.rss", &rss));
    let json = a.ok(&["export", "photos", "--format", "json"]);
    assert_eq!(check_json_feed(&json, None), items);
    let json_file = save("export.json", &json);

    // The directory's news feed.
    let news_atom = a.ok(&["news", "--format", "atom"]);
    let news_ids = check_atom(&news_atom, None);
    assert!(news_ids.len() >= 5, "user, users, folder, invitation, acceptance...: {news_ids:?}");
    xml_files.push(save("news.atom", &news_atom));
    let news_rss = a.ok(&["news", "--format", "rss"]);
    assert_eq!(check_rss(&news_rss), news_ids);
    xml_files.push(save("news.rss", &news_rss));
    let news_json = a.ok(&["news", "--format", "json"]);
    assert_eq!(check_json_feed(&news_json, None), news_ids);
    let news_json_file = save("news.json", &news_json);

    // The relay's feed.atom and feed.json, with a self link.
    let (c, url, rt) = (reqwest::Client::new(), relay.url.clone(), &relay.rt);
    let token = rt.block_on(async {
        let v: Value = c
            .post(format!("{url}/v1/login"))
            .json(&serde_json::json!({"account": "alice", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["token"].as_str().unwrap().to_string()
    });
    let get = |path: &str| -> (String, String) {
        rt.block_on(async {
            let r = c.get(format!("{url}{path}")).bearer_auth(&token).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let kind = r.headers()["content-type"].to_str().unwrap().to_string();
            (kind, r.text().await.unwrap())
        })
    };
    let atom_path = format!("/v1/folders/{folder}/feed.atom");
    let (kind, relay_atom) = get(&atom_path);
    assert_eq!(kind, "application/atom+xml; charset=utf-8");
    assert_eq!(sorted(check_atom(&relay_atom, Some(&format!("{url}{atom_path}")))), items);
    xml_files.push(save("relay.atom", &relay_atom));
    let json_path = format!("/v1/folders/{folder}/feed.json");
    let (kind, relay_json) = get(&json_path);
    assert_eq!(kind, "application/feed+json; charset=utf-8");
    assert_eq!(sorted(check_json_feed(&relay_json, Some(&format!("{url}{json_path}")))), items);
    let relay_json_file = save("relay.json", &relay_json);

    // feed-rs reads every document, all items with the ids and titles we gave them.
    for (text, n) in [(&atom, items.len()), (&rss, items.len()), (&relay_atom, items.len())] {
        let entries = feed_rs(text);
        assert!(entries.len() >= n, "{entries:?}");
        assert!(
            entries.iter().any(|(id, title)| id.ends_with(":item:beach") && title == "Beach \"day\""),
            "{entries:?}"
        );
        assert!(entries.iter().any(|(id, _)| id.ends_with(":item:a%3Ab%2Fc%28d%29")), "{entries:?}");
    }
    for text in [&json, &relay_json] {
        let entries = feed_rs(text);
        assert_eq!(entries.len(), items.len(), "{entries:?}");
        assert!(entries.iter().any(|(id, title)| id.ends_with(":item:beach") && title == "Beach \"day\""));
    }
    for text in [&news_atom, &news_rss, &news_json] {
        assert_eq!(feed_rs(text).len(), news_ids.len());
    }

    // feedparser (bozo false) reads the XML ones; it has no JSON Feed reader (6.0), so the JSON
    // documents are read by Python's jsonfeed-util as the second parser (after feed-rs above).
    match jsonfeed_ready() {
        Ok(()) => {
            let files = [json_file.as_path(), news_json_file.as_path(), relay_json_file.as_path()];
            let read = jsonfeed(&files);
            for ((title, ids), file) in read.iter().zip(&files) {
                assert!(!title.is_empty(), "{}", file.display());
                if file.file_name().unwrap().to_str().unwrap().starts_with("news") {
                    assert_eq!(ids.len(), news_ids.len());
                } else {
                    assert_eq!(ids.len(), items.len(), "{}", file.display());
                    assert!(ids.iter().any(|i| i.ends_with(":item:beach")), "{ids:?}");
                }
            }
            println!("jsonfeed-util read {} JSON Feed documents", files.len());
        }
        Err(why) => println!("SKIPPED jsonfeed-util checks: it could not be installed ({why})"),
    }
    match feedparser_ready() {
        Ok(()) => {
            let files: Vec<&std::path::Path> = xml_files.iter().map(PathBuf::as_path).collect();
            for ((_, version, ids), file) in feedparser(&files).into_iter().zip(&files) {
                let expect = if file.extension().unwrap() == "rss" { "rss20" } else { "atom10" };
                assert_eq!(version, expect, "{}", file.display());
                if file.file_name().unwrap().to_str().unwrap().starts_with("news") {
                    assert_eq!(ids.len(), news_ids.len());
                } else {
                    for id in ["beach", "a%3Ab%2Fc%28d%29", "foreign"] {
                        assert!(ids.iter().any(|i| i.ends_with(&format!(":item:{id}"))), "{id} in {ids:?}");
                    }
                }
            }
            println!("feedparser read {} documents, none bozo", files.len());
        }
        Err(why) => println!("SKIPPED feedparser checks: it could not be installed ({why})"),
    }

    // What was written reads back with every signature intact: the export imported on Bob's
    // device merges as signed, and the relay's own feed.atom POSTed back merges whole.
    for format in ["atom", "rss"] {
        let file = dir.join(format!("export.{format}"));
        let out = b.ok(&["import", "photos", file.to_str().unwrap()]);
        assert!(
            out.contains(&format!(
                "imported {} items: {} merged as signed, 0 written",
                items.len(),
                items.len()
            )),
            "{format}: {out}"
        );
    }
    let posted: Value = rt.block_on(async {
        c.post(format!("{url}/v1/folders/{folder}/feed"))
            .bearer_auth(&token)
            .body(relay_atom.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(posted["merged"], items.len(), "{posted}");
    assert_eq!(posted["changed"], 0, "{posted}");
    assert!(posted["refused"].as_array().unwrap().is_empty(), "{posted}");
}

/// The relay writes items in its log's order; the node by id.
fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

//! Feeds for feed readers (issue 13): a folder's items (or the directory's news) as a valid
//! Atom 1.0 (RFC 4287) or RSS 2.0 document that still carries every item's `sx:sync`, or as a
//! JSON Feed 1.1. The node's `export` and local API, and the relay's `feed.atom` and `feed.json`,
//! all write through here.
//!
//! A FeedSync item's content is signed byte for byte, and is often not what a reader needs (the
//! node's `put` writes `<title>` and `<content type="text">` only; Atom wants `id` and
//! `updated`; RSS wants `guid` and `description`, and no bare `<content>`). So each item's
//! content is *stamped* for its dialect: the elements a reader needs and the item lacks are put
//! in front of it, each marked `fmv:gen=""` (namespace [`VIEW_NS`]; RFC 4287 allows foreign
//! attributes on its elements), and in RSS a top-level `<content>` becomes
//! `<content:encoded fmv:was="">`. [`restore`] undoes exactly that, so a feed written here and
//! read back (`import`, the relay's POST) gives the very bytes that were signed. Unknown content
//! and every `sx:` element are written as they are.

use std::sync::Arc;

use engine::feedsync::{write_feed, Content, Dialect, Feed, FeedsyncError, Item, NsScope, Version, When};
use serde_json::{json, Value};

use crate::view::{escape, title_and_body};

/// feedmesh's namespace for what a view added to an item (`fmv:gen`, `fmv:was`).
pub const VIEW_NS: &str = "urn:feedmesh:view:1";
/// The RSS content module's namespace (`content:encoded`).
pub const CONTENT_NS: &str = "http://purl.org/rss/1.0/modules/content/";
/// JSON Feed's version URL.
pub const JSON_FEED_VERSION: &str = "https://jsonfeed.org/version/1.1";
/// Media types of the three documents.
pub const ATOM_TYPE: &str = "application/atom+xml; charset=utf-8";
pub const RSS_TYPE: &str = "application/rss+xml; charset=utf-8";
pub const JSON_FEED_TYPE: &str = "application/feed+json; charset=utf-8";

const GEN: &str = " fmv:gen=\"\"";
const WAS_OPEN: &str = "<content:encoded fmv:was=\"\"";
const ATOM_NS: &str = engine::feedsync::xml::ATOM_NS;

/// What a document says about itself.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The feed's `atom:id`: an absolute IRI, stable (`urn:feedmesh:folder:HEX`).
    pub id: String,
    /// The feed's title (names the folder).
    pub title: String,
    /// The feed's author (the folder's owner, or the directory).
    pub author: String,
    /// Where this document is served over HTTP (`link rel="self"`), when it is.
    pub self_url: Option<String>,
    /// Entry ids are this prefix and the item's percent-encoded sync id.
    pub entry_prefix: String,
    /// `updated` of a feed no item of which has a dated history entry (the binaries pass now).
    pub fallback_updated: When,
}

impl Meta {
    /// A folder's feed: `urn:feedmesh:folder:HEX`, titled after the folder, by its owner.
    pub fn folder(folder_hex: &str, name: &str, owner: &str, now: When) -> Self {
        let id = format!("urn:feedmesh:folder:{folder_hex}");
        Self {
            entry_prefix: format!("{id}:item:"),
            id,
            title: format!("feedmesh folder {name}"),
            author: owner.to_string(),
            self_url: None,
            fallback_updated: now,
        }
    }

    /// The directory's news feed of the deployment whose cloud id is `cloud_hex`.
    pub fn news(cloud_hex: &str, now: When) -> Self {
        let id = format!("urn:feedmesh:news:{cloud_hex}");
        Self {
            entry_prefix: format!("{id}:change:"),
            id,
            title: "feedmesh directory news".into(),
            author: "feedmesh directory".into(),
            self_url: None,
            fallback_updated: now,
        }
    }

    fn entry_id(&self, sync_id: &str) -> String {
        format!("{}{}", self.entry_prefix, percent_encode(sync_id))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so any sync id makes a
/// valid IRI.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The newest `when` of a version's history (clocks skew: not always the topmost entry's).
pub fn newest_when(version: &Version) -> Option<When> {
    version
        .history
        .iter()
        .filter_map(|h| h.when.as_ref())
        .max_by_key(|w| (w.unix_secs(), w.nanos()))
        .and_then(|w| When::from_parts(w.unix_secs(), w.nanos(), None).ok())
}

fn newest_of_item(item: &Item) -> Option<When> {
    std::iter::once(&item.version)
        .chain(&item.conflicts)
        .filter_map(newest_when)
        .max_by_key(|w| (w.unix_secs(), w.nanos()))
}

/// The feed's `updated`: the newest `when` of any item, else the fallback.
fn feed_updated<'a>(meta: &Meta, items: impl IntoIterator<Item = &'a Item>) -> When {
    items
        .into_iter()
        .filter_map(newest_of_item)
        .max_by_key(|w| (w.unix_secs(), w.nanos()))
        .unwrap_or_else(|| meta.fallback_updated.whole_seconds())
}

use engine::feedsync::xml::children;

fn rfc822(when: &When) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(when.unix_secs()).ok()?;
    t.format(&time::format_description::well_known::Rfc2822).ok()
}

/// The text a reader should show for an item: its text body, else its title, else its id.
fn plain_text(version: &Version) -> String {
    let (title, body) = title_and_body(&version.content);
    body.or(title).unwrap_or_else(|| version.id.as_str().to_string())
}

/// `version` with its content stamped for `dialect` (see the module's comment).
fn stamp(meta: &Meta, version: &Version, dialect: Dialect, scope: &Arc<NsScope>) -> Version {
    let inner = &*version.content.inner;
    let kids = children(inner).unwrap_or_default();
    let has = |name: &str| kids.iter().any(|(n, _)| n == name);
    let id = version.id.as_str();
    let updated = newest_when(version).unwrap_or_else(|| meta.fallback_updated.whole_seconds());
    let mut gen = String::new();
    let mut body = inner.to_string();
    match dialect {
        Dialect::Atom => {
            if !has("id") {
                gen.push_str(&format!("<id{GEN}>{}</id>", escape(&meta.entry_id(id))));
            }
            if !has("title") {
                gen.push_str(&format!("<title{GEN}>{}</title>", escape(id)));
            }
            if !has("updated") {
                gen.push_str(&format!("<updated{GEN}>{}</updated>", updated.to_rfc3339()));
            }
            // RFC 4287 4.1.2: an entry without content needs an alternate link; give it content.
            if !has("content") {
                let text = escape(&plain_text(version));
                gen.push_str(&format!("<content{GEN} type=\"text\">{text}</content>"));
            }
        }
        Dialect::Rss => {
            if !has("guid") {
                gen.push_str(&format!(
                    "<guid{GEN} isPermaLink=\"false\">{}</guid>",
                    escape(&meta.entry_id(id))
                ));
            }
            if !has("description") {
                gen.push_str(&format!("<description{GEN}>{}</description>", escape(&plain_text(version))));
            }
            if !has("pubDate") {
                if let Some(date) = rfc822(&updated) {
                    gen.push_str(&format!("<pubDate{GEN}>{date}</pubDate>"));
                }
            }
            // A bare <content> means nothing in RSS: the content module's element instead.
            if let Some((_, span)) = kids.iter().find(|(n, _)| n == "content") {
                let element = &inner[span.clone()];
                let renamed = match element.strip_suffix("</content>") {
                    Some(open_and_text) => format!("{WAS_OPEN}{}</content:encoded>", &open_and_text[8..]),
                    None => format!("{WAS_OPEN}{}", &element[8..]),
                };
                body = format!("{}{renamed}{}", &inner[..span.start], &inner[span.end..]);
            }
        }
    }
    let mut out = version.clone();
    out.content = Arc::new(Content {
        attrs: version.content.attrs.clone(),
        inner: format!("{gen}{body}").into(),
        scope: scope.clone(),
    });
    out
}

/// Undoes [`stamp`]: drops leading elements marked `fmv:gen` and renames a marked
/// `content:encoded` back to `content`. Content that has neither is returned unchanged.
pub fn restore_content(inner: &str) -> Option<String> {
    if !inner.contains("fmv:") {
        return None;
    }
    let mut rest = inner;
    while let Some((_, span)) = children(rest).and_then(|kids| kids.into_iter().next()) {
        let element = &rest[span.clone()];
        let generated = span.start == 0 && start_tag(element).is_some_and(|tag| tag.contains(GEN));
        if !generated {
            break;
        }
        rest = &rest[span.end..];
    }
    let mut out = rest.to_string();
    if let Some(kids) = children(rest) {
        if let Some((_, span)) = kids.iter().find(|(n, _)| n == "content:encoded") {
            let element = &rest[span.clone()];
            if let Some(after) = element.strip_prefix(WAS_OPEN) {
                let renamed = match after.strip_suffix("</content:encoded>") {
                    Some(middle) => format!("<content{middle}</content>"),
                    None => format!("<content{after}"),
                };
                out = format!("{}{renamed}{}", &rest[..span.start], &rest[span.end..]);
            }
        }
    }
    (out != inner).then_some(out)
}

/// The start tag of an element's raw text.
fn start_tag(element: &str) -> Option<&str> {
    element.find('>').map(|end| &element[..=end])
}

fn restore_version(version: &Version) -> Version {
    match restore_content(&version.content.inner) {
        None => version.clone(),
        Some(inner) => {
            let mut out = version.clone();
            out.content = Arc::new(Content {
                attrs: version.content.attrs.clone(),
                inner: inner.into(),
                scope: version.content.scope.clone(),
            });
            out
        }
    }
}

/// An item read from a feed written here, as it was before it was stamped (signatures verify
/// again). Items from elsewhere come back unchanged.
pub fn restore(item: &Item) -> Item {
    let mut out = item.clone();
    out.version = restore_version(&item.version);
    out.conflicts = item.conflicts.iter().map(restore_version).collect();
    out
}

fn scope_with(feed: &Feed, extra: &[(&str, &str)]) -> Arc<NsScope> {
    let mut bindings = feed.envelope.scope.bindings.clone();
    for (prefix, uri) in extra {
        if !bindings.iter().any(|(p, _)| &**p == *prefix) {
            bindings.push(((*prefix).into(), (*uri).into()));
        }
    }
    bindings.sort_by(|a, b| a.0.cmp(&b.0));
    Arc::new(NsScope { bindings })
}

fn stamped_feed<'a>(
    meta: &Meta,
    dialect: Dialect,
    items: impl IntoIterator<Item = &'a Item>,
) -> Result<Feed, FeedsyncError> {
    let items: Vec<&Item> = items.into_iter().collect();
    let updated = feed_updated(meta, items.iter().copied());
    let mut feed = Feed::new(dialect);
    let title = escape(&meta.title);
    let author = escape(&meta.author);
    match dialect {
        Dialect::Atom => {
            feed.envelope.root_attrs = format!(r#" xmlns="{ATOM_NS}" xmlns:fmv="{VIEW_NS}""#).into();
            feed.envelope.scope = scope_with(&feed, &[("fmv", VIEW_NS)]);
            let mut head = vec![
                format!("<id>{}</id>", escape(&meta.id)),
                format!("<title>{title}</title>"),
                format!("<updated>{}</updated>", updated.to_rfc3339()),
                format!("<author><name>{author}</name></author>"),
                "<generator>feedmesh</generator>".to_string(),
            ];
            if let Some(url) = &meta.self_url {
                head.push(format!(
                    r#"<link rel="self" type="application/atom+xml" href="{}"/>"#,
                    escape(url)
                ));
            }
            feed.envelope.head = head.into_iter().map(Into::into).collect();
        }
        Dialect::Rss => {
            feed.envelope.root_attrs = format!(
                r#" version="2.0" xmlns:content="{CONTENT_NS}" xmlns:atom="{ATOM_NS}" xmlns:fmv="{VIEW_NS}""#
            )
            .into();
            feed.envelope.scope =
                scope_with(&feed, &[("content", CONTENT_NS), ("atom", ATOM_NS), ("fmv", VIEW_NS)]);
            let link = meta.self_url.clone().unwrap_or_else(|| meta.id.clone());
            let mut head = vec![
                format!("<title>{title}</title>"),
                format!("<link>{}</link>", escape(&link)),
                format!("<description>{title}, by {author}</description>"),
                "<generator>feedmesh</generator>".to_string(),
            ];
            if let Some(date) = rfc822(&updated) {
                head.push(format!("<lastBuildDate>{date}</lastBuildDate>"));
            }
            if let Some(url) = &meta.self_url {
                head.push(format!(
                    r#"<atom:link rel="self" type="application/rss+xml" href="{}"/>"#,
                    escape(url)
                ));
            }
            feed.envelope.head = head.into_iter().map(Into::into).collect();
        }
    }
    let scope = feed.envelope.scope.clone();
    for item in items {
        let mut out = item.clone();
        out.version = stamp(meta, &item.version, dialect, &scope);
        out.conflicts = item.conflicts.iter().map(|c| stamp(meta, c, dialect, &scope)).collect();
        feed.put(out)?;
    }
    Ok(feed)
}

/// The items as an Atom 1.0 document (RFC 4287) with FeedSync's `sx:sync` in every entry.
pub fn atom<'a>(meta: &Meta, items: impl IntoIterator<Item = &'a Item>) -> Result<String, FeedsyncError> {
    Ok(write_feed(&stamped_feed(meta, Dialect::Atom, items)?))
}

/// The items as an RSS 2.0 document with FeedSync's `sx:sync` in every item.
pub fn rss<'a>(meta: &Meta, items: impl IntoIterator<Item = &'a Item>) -> Result<String, FeedsyncError> {
    Ok(write_feed(&stamped_feed(meta, Dialect::Rss, items)?))
}

/// The document of `dialect`.
pub fn document<'a>(
    meta: &Meta,
    dialect: Dialect,
    items: impl IntoIterator<Item = &'a Item>,
) -> Result<String, FeedsyncError> {
    Ok(write_feed(&stamped_feed(meta, dialect, items)?))
}

/// The items as a JSON Feed 1.1. FeedSync's state of each item is in its `_feedsync`
/// extension object (JSON Feed's rule for extensions: a key that starts with `_`).
pub fn json_feed<'a>(meta: &Meta, items: impl IntoIterator<Item = &'a Item>) -> Value {
    let items: Vec<&Item> = items.into_iter().collect();
    let updated = feed_updated(meta, items.iter().copied());
    let list: Vec<Value> = items
        .iter()
        .map(|item| {
            let v = &item.version;
            let (title, _) = title_and_body(&v.content);
            let modified = newest_when(v).unwrap_or_else(|| meta.fallback_updated.whole_seconds());
            let history: Vec<Value> = v
                .history
                .iter()
                .map(|h| {
                    json!({
                        "sequence": h.sequence,
                        "when": h.when.as_ref().map(|w| w.to_rfc3339()),
                        "by": h.by.as_ref().map(|b| b.as_str().to_string()),
                    })
                })
                .collect();
            json!({
                "id": meta.entry_id(v.id.as_str()),
                "title": title.unwrap_or_else(|| v.id.as_str().to_string()),
                "content_text": plain_text(v),
                "date_modified": modified.to_rfc3339(),
                "_feedsync": {
                    "id": v.id.as_str(),
                    "updates": v.updates,
                    "deleted": v.deleted,
                    "noconflicts": v.noconflicts,
                    "history": history,
                    "conflicts": item.conflicts.len(),
                    "signed": v.signature.is_some(),
                    "content": &*v.content.inner,
                },
            })
        })
        .collect();
    let mut feed = json!({
        "version": JSON_FEED_VERSION,
        "title": meta.title,
        "description": format!("{}, by {}", meta.title, meta.author),
        "authors": [{ "name": meta.author }],
        "_feedsync": { "id": meta.id, "updated": updated.to_rfc3339() },
        "items": list,
    });
    if let Some(url) = &meta.self_url {
        feed["feed_url"] = json!(url);
    }
    feed
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::feedsync::{read_feed, Endpoint, ItemId};

    fn item(id: &str, inner: &str, when: i64) -> Item {
        let content = Arc::new(Content {
            attrs: "".into(),
            inner: inner.into(),
            scope: Arc::new(NsScope { bindings: vec![("".into(), ATOM_NS.into())] }),
        });
        let by = Endpoint::new("dev").unwrap();
        Item::create(ItemId::new(id).unwrap(), &by, &When::from_unix_secs(when).unwrap(), content, false)
    }

    fn meta() -> Meta {
        Meta::folder("00ff", "photos", "alice", When::from_unix_secs(1_700_000_000).unwrap())
    }

    #[test]
    fn a_stamped_feed_reads_back_to_the_items_it_was_made_of() {
        let items = [
            item(
                "beach",
                "<title>Beach</title><content type=\"text\">sand &amp; sea</content>",
                1_750_000_000,
            ),
            item("empty", "<content type=\"text\"/>", 1_750_000_001),
            item("bare", "", 1_750_000_002),
            item("odd:id/with(paren)%20", "<summary>x</summary><foo:bar xmlns:foo=\"urn:x\">y</foo:bar>", 1),
        ];
        for dialect in [Dialect::Atom, Dialect::Rss] {
            let text = document(&meta(), dialect, &items).unwrap();
            assert!(text.contains("fmv:gen"), "{text}");
            let back = read_feed(text.as_bytes()).unwrap();
            assert_eq!(back.len(), items.len());
            for (read, original) in back.items().zip(&items) {
                let restored = restore(read);
                assert_eq!(restored.version.content.inner, original.version.content.inner, "{dialect:?}");
                assert_eq!(restored.version, original.version, "{dialect:?}");
            }
        }
    }

    #[test]
    fn rss_has_no_bare_content_and_atom_has_one_id_per_entry() {
        let items =
            [item("beach", "<title>Beach</title><content type=\"text\">sea</content>", 1_750_000_000)];
        let rss = rss(&meta(), &items).unwrap();
        assert!(rss.contains("<content:encoded fmv:was=\"\" type=\"text\">sea</content:encoded>"), "{rss}");
        assert!(!rss.contains("<content "), "{rss}");
        assert!(rss
            .contains("<guid fmv:gen=\"\" isPermaLink=\"false\">urn:feedmesh:folder:00ff:item:beach</guid>"));
        let atom = atom(&meta(), &items).unwrap();
        assert_eq!(atom.matches("<id").count(), 2, "{atom}");
        assert!(atom.contains("<updated>2025-06-15T15:06:40Z</updated>"), "{atom}");
        assert!(!atom.contains("1970"), "{atom}");
    }

    #[test]
    fn ids_are_percent_encoded() {
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
    }
}

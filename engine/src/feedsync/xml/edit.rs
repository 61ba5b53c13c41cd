//! Small edits of an item's raw content: set its title; keep an Atom entry's `id`/`updated` valid.

use std::sync::Arc;

use quick_xml::escape::escape;
use quick_xml::events::Event;
use quick_xml::Reader;

use super::super::model::{Content, Dialect, Envelope, ItemId, When};

/// Top-level children of raw content as `(qualified name, byte span)`. `None` if unparsable.
/// Bounded by the content: one pass of quick-xml over it.
pub fn children(inner: &str) -> Option<Vec<(String, std::ops::Range<usize>)>> {
    let mut reader = Reader::from_str(inner);
    reader.config_mut().check_end_names = true;
    let mut out = Vec::new();
    loop {
        let start = reader.buffer_position() as usize;
        match reader.read_event().ok()? {
            Event::Start(e) => {
                let name = e.name().as_ref().to_string();
                reader.read_to_end(e.name()).ok()?;
                out.push((name, start..reader.buffer_position() as usize));
            }
            Event::Empty(e) => {
                let name = e.name().as_ref().to_string();
                out.push((name, start..reader.buffer_position() as usize));
            }
            Event::Eof => return Some(out),
            Event::End(_) => return None,
            _ => {}
        }
    }
}

/// Replaces the first top-level child named `qname` with `<qname>text</qname>`, or inserts it
/// at `insert_at` (a child index) when there is none.
fn set_child(content: &Content, qname: &str, text: &str, insert_at: usize) -> Content {
    let element = format!("<{qname}>{}</{qname}>", escape(text));
    let inner = &*content.inner;
    let kids = children(inner).unwrap_or_default();
    let new_inner = match kids.iter().find(|(name, _)| name == qname) {
        Some((_, span)) => format!("{}{element}{}", &inner[..span.start], &inner[span.end..]),
        None => {
            let at = kids.get(insert_at).map(|(_, span)| span.start).unwrap_or(inner.len());
            format!("{}{element}{}", &inner[..at], &inner[at..])
        }
    };
    Content { attrs: content.attrs.clone(), inner: new_inner.into(), scope: content.scope.clone() }
}

fn has_child(content: &Content, qname: &str) -> bool {
    children(&content.inner).unwrap_or_default().iter().any(|(name, _)| name == qname)
}

/// The prefix (with its colon) that the feed uses for its item elements, e.g. `atom:` or ``.
fn item_prefix(envelope: &Envelope) -> &str {
    match envelope.item_name.rfind(':') {
        Some(i) => &envelope.item_name[..=i],
        None => "",
    }
}

/// The content with its `title` set to `title`.
pub fn set_title(content: &Content, envelope: &Envelope, title: &str) -> Arc<Content> {
    let qname = format!("{}title", item_prefix(envelope));
    Arc::new(set_child(content, &qname, title, 0))
}

/// For Atom: makes sure the entry has an `id` (`urn:feedsync:ID` when it had none), a `title`
/// (empty when it had none) and sets `updated` to `when`, as Atom requires of every entry.
/// For RSS: makes sure the item has a `title` (its sync id when it had none).
pub fn stamp_atom_entry(
    content: &Content,
    envelope: &Envelope,
    dialect: Dialect,
    id: &ItemId,
    when: &When,
) -> Arc<Content> {
    let prefix = item_prefix(envelope);
    let title = format!("{prefix}title");
    let mut next = content.clone();
    match dialect {
        Dialect::Rss => {
            if !has_child(&next, &title) {
                next = set_child(&next, &title, id.as_str(), 0);
            }
        }
        Dialect::Atom => {
            if !has_child(&next, &title) {
                next = set_child(&next, &title, "", 0);
            }
            let id_name = format!("{prefix}id");
            if !has_child(&next, &id_name) {
                next = set_child(&next, &id_name, &format!("urn:feedsync:{id}"), 1);
            }
            next = set_child(&next, &format!("{prefix}updated"), &when.whole_seconds().to_rfc3339(), 2);
        }
    }
    Arc::new(next)
}

//! FeedSync writer: the feed in its own dialect, `sx:sync` first in each item, raw content as read.

use std::fmt::Write as _;
use std::sync::Arc;

use quick_xml::escape::escape;

use super::super::model::{Content, Dialect, Feed, NsScope, Related, RelatedKind, Sharing, Version};
use super::FEEDSYNC_NS;

/// Writes the feed as an XML document (UTF-8).
pub fn write_feed(feed: &Feed) -> String {
    let env = &feed.envelope;
    let mut out = String::with_capacity(256 + feed.len() * 320);
    out.push_str("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n");
    let root_name = name_or(&env.root_name, feed.dialect, "rss", "feed");
    let item_name = name_or(&env.item_name, feed.dialect, "item", "entry");
    // Our prefix for FeedSync elements: `sx` unless the document binds it to something else.
    let sx = feedsync_prefix(&env.scope);
    let declare =
        if env.scope.uri(&sx).is_none() { format!(" xmlns:{sx}=\"{FEEDSYNC_NS}\"") } else { String::new() };
    let _ = writeln!(out, "<{root_name}{}{declare}>", env.root_attrs);
    let indent = match feed.dialect {
        Dialect::Rss => {
            let channel = if env.channel_name.is_empty() { "channel" } else { &env.channel_name };
            let _ = writeln!(out, "  <{channel}{}>", env.channel_attrs);
            "    "
        }
        Dialect::Atom => "  ",
    };
    if let Some(sharing) = &feed.sharing {
        write_sharing(&mut out, sharing, indent, &sx);
    }
    for head in &env.head {
        out.push_str(indent);
        out.push_str(head);
        out.push('\n');
    }
    let mut plain = feed.plain.iter().peekable();
    for (index, item) in feed.items.values().enumerate() {
        while let Some(p) = plain.next_if(|p| p.position as usize <= index) {
            write_plain(&mut out, &p.raw, &p.scope, &env.scope, indent, &sx);
        }
        let inner_indent = format!("{indent}  ");
        open_item(&mut out, item_name, &item.version.content, &env.scope, indent, &sx);
        write_sync(&mut out, &sx, &item.version, &inner_indent, |out, conflict_indent| {
            for conflict in &item.conflicts {
                let deeper = format!("{conflict_indent}  ");
                open_item(out, item_name, &conflict.content, &env.scope, conflict_indent, &sx);
                write_sync(out, &sx, conflict, &deeper, |_, _| false);
                close_item(out, item_name, &conflict.content);
            }
            !item.conflicts.is_empty()
        });
        close_item(&mut out, item_name, &item.version.content);
    }
    for p in plain {
        write_plain(&mut out, &p.raw, &p.scope, &env.scope, indent, &sx);
    }
    if feed.dialect == Dialect::Rss {
        let channel = if env.channel_name.is_empty() { "channel" } else { &env.channel_name };
        let _ = writeln!(out, "  </{channel}>");
    }
    let _ = writeln!(out, "</{root_name}>");
    out
}

/// `sx`, or the first of `fs`, `feedsync`, `sx1`, `sx2`, ... that the document leaves unbound or
/// binds to the FeedSync namespace.
fn feedsync_prefix(scope: &NsScope) -> String {
    let usable = |p: &str| scope.uri(p).is_none_or(|uri| uri == FEEDSYNC_NS);
    for candidate in ["sx", "fs", "feedsync"] {
        if usable(candidate) {
            return candidate.to_string();
        }
    }
    // The scope is finite, so some numbered prefix is free.
    (1..).map(|n| format!("sx{n}")).find(|p| usable(p)).unwrap_or_default()
}

fn name_or<'a>(name: &'a str, dialect: Dialect, rss: &'a str, atom: &'a str) -> &'a str {
    match (name.is_empty(), dialect) {
        (false, _) => name,
        (true, Dialect::Rss) => rss,
        (true, Dialect::Atom) => atom,
    }
}

/// Namespace declarations an item needs where it lands: bindings of its source scope that the
/// output scope lacks or binds differently, and an undeclared default namespace.
fn scope_fix(item: &NsScope, output: &NsScope, sx: &str) -> String {
    let mut out = String::new();
    if item == output {
        return out;
    }
    for (prefix, uri) in &item.bindings {
        if &**prefix == sx || output.uri(prefix) == Some(&**uri) {
            continue;
        }
        let value = escape(&**uri);
        if prefix.is_empty() {
            let _ = write!(out, " xmlns=\"{value}\"");
        } else {
            let _ = write!(out, " xmlns:{prefix}=\"{value}\"");
        }
    }
    if item.uri("").is_none() && output.uri("").is_some_and(|u| !u.is_empty()) {
        out.push_str(" xmlns=\"\"");
    }
    out
}

fn open_item(out: &mut String, name: &str, content: &Content, output: &Arc<NsScope>, indent: &str, sx: &str) {
    let fix = if Arc::ptr_eq(&content.scope, output) {
        String::new()
    } else {
        scope_fix(&content.scope, output, sx)
    };
    let _ = writeln!(out, "{indent}<{name}{}{fix}>", content.attrs);
}

/// Raw content follows `sx:sync` directly and the end tag follows it directly, so that any text
/// at its edges is written back exactly as read.
fn close_item(out: &mut String, name: &str, content: &Content) {
    out.push_str(&content.inner);
    let _ = writeln!(out, "</{name}>");
}

fn write_plain(out: &mut String, raw: &str, scope: &NsScope, output: &NsScope, indent: &str, sx: &str) {
    out.push_str(indent);
    let fix = scope_fix(scope, output, sx);
    if fix.is_empty() {
        out.push_str(raw);
    } else if let Some(end) = start_tag_name_end(raw) {
        out.push_str(&raw[..end]);
        out.push_str(&fix);
        out.push_str(&raw[end..]);
    } else {
        out.push_str(raw);
    }
    out.push('\n');
}

/// The byte index just after the element name of the raw element's start tag.
fn start_tag_name_end(raw: &str) -> Option<usize> {
    let rest = raw.strip_prefix('<')?;
    let len = rest.find(|c: char| c.is_whitespace() || c == '>' || c == '/')?;
    Some(1 + len)
}

/// Writes `sx:sync` with its history; `conflicts` writes the conflict items (returns whether it
/// wrote any, given the indent to use inside `sx:conflicts`).
fn write_sync(
    out: &mut String,
    sx: &str,
    version: &Version,
    indent: &str,
    conflicts: impl FnOnce(&mut String, &str) -> bool,
) {
    let _ = write!(
        out,
        "{indent}<{sx}:sync id=\"{}\" updates=\"{}\"",
        escape(version.id.as_str()),
        version.updates
    );
    if version.deleted {
        out.push_str(" deleted=\"true\"");
    }
    if version.noconflicts {
        out.push_str(" noconflicts=\"true\"");
    }
    out.push_str(">\n");
    for entry in version.history.iter() {
        let _ = write!(out, "{indent}  <{sx}:history sequence=\"{}\"", entry.sequence);
        if let Some(when) = &entry.when {
            let _ = write!(out, " when=\"{}\"", escape(when.to_rfc3339()));
        }
        if let Some(by) = &entry.by {
            let _ = write!(out, " by=\"{}\"", escape(by.as_str()));
        }
        out.push_str("/>\n");
    }
    if let Some(signature) = &version.signature {
        let _ = writeln!(
            out,
            "{indent}  <fms:signature xmlns:fms=\"{}\">{}</fms:signature>",
            super::SIGNATURE_NS,
            signature.to_hex()
        );
    }
    let mark = out.len();
    let _ = writeln!(out, "{indent}  <{sx}:conflicts>");
    let body = out.len();
    if conflicts(out, &format!("{indent}    ")) && out.len() > body {
        let _ = writeln!(out, "{indent}  </{sx}:conflicts>");
    } else {
        out.truncate(mark);
    }
    let _ = write!(out, "{indent}</{sx}:sync>");
}

fn write_sharing(out: &mut String, sharing: &Sharing, indent: &str, sx: &str) {
    out.push_str(indent);
    out.push('<');
    out.push_str(sx);
    out.push_str(":sharing");
    if let Some((since, until)) = &sharing.window {
        let _ = write!(out, " since=\"{}\" until=\"{}\"", escape(since.as_str()), escape(until.as_str()));
    }
    if let Some(expires) = &sharing.expires {
        let _ = write!(out, " expires=\"{}\"", escape(expires.to_rfc3339()));
    }
    if sharing.related.is_empty() {
        out.push_str("/>\n");
        return;
    }
    out.push_str(">\n");
    for Related { link, kind, title } in &sharing.related {
        let kind = match kind {
            RelatedKind::Complete => "complete",
            RelatedKind::Aggregated => "aggregated",
        };
        let _ = write!(out, "{indent}  <{sx}:related link=\"{}\" type=\"{kind}\"", escape(link.as_str()));
        if let Some(title) = title {
            let _ = write!(out, " title=\"{}\"", escape(title.as_str()));
        }
        out.push_str("/>\n");
    }
    let _ = writeln!(out, "{indent}</{sx}:sharing>");
}

//! How items look to people and to JSON clients (the relay's and the node's HTTP APIs and the
//! CLI share it). Items made by `feedmesh put` carry an Atom-style `<title>` and a text
//! `<content>`; other content is shown raw.

use std::sync::Arc;

use engine::feedsync::{Content, Dialect, Feed, Item, NsScope, Version};
use serde_json::{json, Value};

/// Text safe to print on a terminal: control characters other than newline and tab, and the
/// Unicode bidirectional overrides, are shown as `\u{..}` escapes instead of acting on the
/// terminal (content, ids and names come from other devices; issue 11).
pub fn terminal_text(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.contains(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if unsafe_char(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

fn element(inner: &str, name: &str) -> Option<String> {
    let start = inner.find(&format!("<{name}"))?;
    let open_end = start + inner[start..].find('>')? + 1;
    if inner[..open_end].ends_with("/>") {
        return Some(String::new());
    }
    let close = open_end + inner[open_end..].find(&format!("</{name}>"))?;
    Some(unescape(&inner[open_end..close]))
}

/// Content with an optional title and a text body.
pub fn content(title: Option<&str>, body: &str) -> Arc<Content> {
    let mut inner = String::new();
    if let Some(t) = title {
        inner.push_str("<title>");
        inner.push_str(&escape(t));
        inner.push_str("</title>");
    }
    inner.push_str("<content type=\"text\">");
    inner.push_str(&escape(body));
    inner.push_str("</content>");
    let scope = NsScope { bindings: vec![("".into(), engine::feedsync::xml::ATOM_NS.into())] };
    Arc::new(Content { attrs: "".into(), inner: inner.into(), scope: Arc::new(scope) })
}

fn rescoped_version(v: &Version, scope: &Arc<NsScope>) -> Version {
    let mut v = v.clone();
    v.content = Arc::new(Content {
        attrs: v.content.attrs.clone(),
        inner: v.content.inner.clone(),
        scope: scope.clone(),
    });
    v
}

/// A feed of `dialect` holding `items`. Each item's content is placed in the feed's namespace
/// scope, so an item written on one dialect reads back as an item of the other (the scope is not
/// part of a version's identity: signatures stay valid).
pub fn feed_of<'a>(
    dialect: Dialect,
    items: impl IntoIterator<Item = &'a Item>,
) -> Result<Feed, engine::feedsync::FeedsyncError> {
    let mut feed = Feed::new(dialect);
    let scope = feed.envelope.scope.clone();
    for item in items {
        let mut out = item.clone();
        out.version = rescoped_version(&item.version, &scope);
        out.conflicts = item.conflicts.iter().map(|c| rescoped_version(c, &scope)).collect();
        feed.put(out)?;
    }
    Ok(feed)
}

/// The title and text body of an item's content.
pub fn title_and_body(content: &Content) -> (Option<String>, Option<String>) {
    (element(&content.inner, "title"), element(&content.inner, "content"))
}

/// An item as JSON.
pub fn item_json(item: &Item, with_content: bool) -> Value {
    let v = &item.version;
    let top = v.topmost();
    let (title, text) = title_and_body(&v.content);
    let mut out = json!({
        "id": v.id.as_str(),
        "title": title,
        "deleted": v.deleted,
        "updates": v.updates,
        "by": top.by.as_ref().map(|b| b.as_str().to_string()),
        "when": top.when.as_ref().map(|w| w.to_rfc3339()),
        "conflicts": item.conflicts.len(),
        "signed": v.signature.is_some(),
    });
    if with_content {
        out["text"] = json!(text);
        out["content"] = Value::String(v.content.inner.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_text_escapes_what_would_act_on_a_terminal() {
        assert_eq!(terminal_text("plain\ttext\nnext"), "plain\ttext\nnext");
        assert_eq!(terminal_text("red \u{1b}[31m!"), "red \\u{1b}[31m!");
        assert_eq!(terminal_text("a\rb\u{7f}"), "a\\u{d}b\\u{7f}");
        assert_eq!(terminal_text("\u{202e}abc"), "\\u{202e}abc");
    }
}

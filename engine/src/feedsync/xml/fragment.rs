//! Checks an item's raw content before it is accepted from anywhere (a local edit, the wire, a
//! POST): its attributes and children must be well-formed XML that can stand inside an
//! `<item>`/`<entry>` of any feed, so that writing it cannot break the document or smuggle in
//! markup of another item (issue 11: a control character made exports unreadable, and unchecked
//! wire content could close the entry and inject a forged, unsigned one).
//!
//! What the reader of a whole feed accepts passes here; the checks are the reader's (XML 1.0
//! characters, balanced and matching tags, valid references) plus two of the item's own: no
//! XML declaration, DOCTYPE or processing instruction, and no child `sx:sync` (the item has one,
//! kept apart from its content).

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::super::limits;
use super::super::model::{Content, NsScope};
use super::{FEEDSYNC_NS, SSE_NS};

/// Why raw content is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentProblem {
    #[error("character U+{code:04X} at byte {at} is not allowed in XML")]
    Character { at: usize, code: u32 },
    #[error("not well-formed XML at byte {at}")]
    Malformed { at: usize },
    #[error("an end tag at byte {at} closes an element the content did not open")]
    Unbalanced { at: usize },
    #[error("elements left open at the end of the content")]
    Unclosed,
    #[error("elements nested deeper than {max}", max = limits::DEPTH_MAX)]
    TooDeep,
    #[error("an XML declaration, DOCTYPE or processing instruction in item content")]
    Prolog,
    #[error("a FeedSync `sync` element among the item's children")]
    SyncElement,
    #[error("item attributes are not a well-formed attribute list")]
    Attributes,
}

/// XML 1.0 `Char` minus what a document may not hold even escaped: C0 controls but tab, LF and
/// CR; U+FFFE and U+FFFF.
/// A character XML 1.0 does not allow in a document, even escaped (C0 controls other than tab,
/// newline and carriage return; U+FFFE; U+FFFF).
pub fn forbidden(c: char) -> bool {
    (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || c == '\u{fffe}' || c == '\u{ffff}'
}

fn check_chars(text: &str, base: usize) -> Result<(), ContentProblem> {
    match text.char_indices().find(|(_, c)| forbidden(*c)) {
        Some((at, c)) => Err(ContentProblem::Character { at: base + at, code: u32::from(c) }),
        None => Ok(()),
    }
}

/// Every attribute of `start` parses, its value unescapes to allowed characters.
fn check_attributes(start: &BytesStart<'_>, at: usize) -> Result<(), ContentProblem> {
    for attr in start.attributes().with_checks(true) {
        let attr = attr.map_err(|_| ContentProblem::Attributes)?;
        let value = attr
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|_| ContentProblem::Malformed { at })?;
        check_chars(&value, at)?;
    }
    Ok(())
}

/// The namespace `prefix` names at a top-level child: its own declaration, else the scope.
fn namespace_of(start: &BytesStart<'_>, prefix: &str, scope: &NsScope) -> Option<String> {
    let wanted = if prefix.is_empty() { "xmlns".to_string() } else { format!("xmlns:{prefix}") };
    for attr in start.attributes().flatten() {
        if attr.key.as_ref() == wanted {
            return attr.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok().map(|v| v.into_owned());
        }
    }
    scope.uri(prefix).map(str::to_string)
}

/// Checks `content` (see the module docs).
pub fn check_content(content: &Content) -> Result<(), ContentProblem> {
    check_chars(&content.attrs, 0)?;
    check_chars(&content.inner, 0)?;
    // The attributes, as they will be written: inside a start tag.
    let tag = format!("<x {}/>", content.attrs);
    let mut reader = Reader::from_str(&tag);
    match reader.read_event() {
        Ok(Event::Empty(start)) => check_attributes(&start, 0).map_err(|_| ContentProblem::Attributes)?,
        _ => return Err(ContentProblem::Attributes),
    }
    if !matches!(reader.read_event(), Ok(Event::Eof)) {
        return Err(ContentProblem::Attributes);
    }
    let mut reader = Reader::from_str(&content.inner);
    let config = reader.config_mut();
    config.check_end_names = true;
    config.check_comments = true;
    config.trim_text(false);
    config.expand_empty_elements = false;
    let mut depth = 0usize;
    // Bound: each event consumes input, so there are at most as many events as bytes.
    loop {
        let at = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|_| match depth {
            0 => ContentProblem::Unbalanced { at },
            _ => ContentProblem::Malformed { at },
        })?;
        match event {
            Event::Start(start) => {
                check_child(&start, depth, at, &content.scope)?;
                depth += 1;
                if depth > limits::DEPTH_MAX {
                    return Err(ContentProblem::TooDeep);
                }
            }
            Event::Empty(start) => check_child(&start, depth, at, &content.scope)?,
            Event::End(_) => depth = depth.checked_sub(1).ok_or(ContentProblem::Unbalanced { at })?,
            // Text holds no references (they are `GeneralRef`s); its characters were checked above.
            Event::Text(_) | Event::CData(_) | Event::Comment(_) => {}
            Event::GeneralRef(r) => match r.resolve_char_ref() {
                Ok(Some(c)) if forbidden(c) => {
                    return Err(ContentProblem::Character { at, code: u32::from(c) })
                }
                Ok(Some(_)) => {}
                Ok(None) if quick_xml::escape::resolve_xml_entity(&r).is_some() => {}
                Ok(None) | Err(_) => return Err(ContentProblem::Malformed { at }),
            },
            Event::Decl(_) | Event::DocType(_) | Event::PI(_) => return Err(ContentProblem::Prolog),
            Event::Eof => break,
        }
    }
    if depth != 0 {
        return Err(ContentProblem::Unclosed);
    }
    Ok(())
}

/// An element's attributes; at the top level, also that it is not a FeedSync `sync`.
fn check_child(
    start: &BytesStart<'_>,
    depth: usize,
    at: usize,
    scope: &NsScope,
) -> Result<(), ContentProblem> {
    check_attributes(start, at)?;
    if depth > 0 {
        return Ok(());
    }
    let name = start.name();
    let (prefix, local) = name.as_ref().split_once(':').unwrap_or(("", name.as_ref()));
    if local != "sync" {
        return Ok(());
    }
    match namespace_of(start, prefix, scope).as_deref() {
        Some(FEEDSYNC_NS | SSE_NS) => Err(ContentProblem::SyncElement),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn content(attrs: &str, inner: &str) -> Content {
        Content { attrs: attrs.into(), inner: inner.into(), scope: Arc::new(NsScope::default()) }
    }

    #[test]
    fn well_formed_content_passes() {
        for (attrs, inner) in [
            ("", ""),
            ("", "<title>a &amp; b &#233;</title>"),
            (r#"xml:lang="en" a='1'"#, r#"<link href="x"/><x:y xmlns:x="u">t<![CDATA[<>]]></x:y>"#),
            ("", "<!-- note --><title>t</title>"),
            ("", "text with\ttab\nand newline"),
        ] {
            assert_eq!(check_content(&content(attrs, inner)), Ok(()), "{attrs} {inner}");
        }
    }

    /// A case: namespace attributes, content, and what the problem must be.
    type Case = (&'static str, &'static str, fn(&ContentProblem) -> bool);

    #[test]
    fn bad_content_is_refused_with_its_reason() {
        use ContentProblem::*;
        let cases: &[Case] = &[
            ("", "<title>\u{1}</title>", |p| matches!(p, Character { code: 1, .. })),
            ("", "<title>\u{1b}[31m</title>", |p| matches!(p, Character { code: 0x1b, .. })),
            ("", "<title>&#1;</title>", |p| matches!(p, Character { code: 1, .. })),
            ("", "<title>a</title></entry><entry><title>forged</title>", |p| matches!(p, Unbalanced { .. })),
            ("", "<title>", |p| matches!(p, Unclosed)),
            ("", "<a></b>", |p| matches!(p, Malformed { .. })),
            ("", "<title>&bogus;</title>", |p| matches!(p, Malformed { .. })),
            ("", "<?xml version=\"1.0\"?><t/>", |p| matches!(p, Prolog)),
            ("", r#"<sx:sync xmlns:sx="http://feedsync.org/2007/feedsync" id="x"/>"#, |p| {
                matches!(p, SyncElement)
            }),
            (r#"a="1"><evil/"#, "", |p| matches!(p, Attributes)),
            ("a=1", "", |p| matches!(p, Attributes)),
        ];
        for (attrs, inner, expected) in cases {
            let got = check_content(&content(attrs, inner)).expect_err(inner);
            assert!(expected(&got), "{attrs:?} {inner:?}: {got:?}");
        }
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "<a>".repeat(limits::DEPTH_MAX + 1) + &"</a>".repeat(limits::DEPTH_MAX + 1);
        assert_eq!(check_content(&content("", &deep)), Err(ContentProblem::TooDeep));
    }
}

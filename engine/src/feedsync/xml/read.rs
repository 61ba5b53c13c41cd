//! Streaming, bounded FeedSync reader for RSS 2.0 and Atom (quick-xml, no DOM).
//!
//! Structure is checked strictly; semantic problems (a bad attribute, a duplicate id) are collected
//! so that `validate` can report them all, up to [`limits::PROBLEMS_MAX`]; malformed XML stops the
//! read at once. Everything but `sx:sync` is kept as raw XML text, so unknown elements and
//! attributes survive a read-merge-write round trip.

use std::sync::Arc;

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, PrefixDeclaration, ResolveResult};
use quick_xml::NsReader;

use super::super::limits;
use super::super::merge::compare;
use super::super::model::{
    Content, Dialect, Endpoint, Envelope, Feed, HistoryEntry, Item, ItemId, NsScope, PlainItem, Related,
    RelatedKind, Sharing, Version, When,
};
use super::{Problem, ProblemKind, ReadError, ATOM_NS, FEEDSYNC_NS, SIGNATURE_NS, SSE_NS};

type Reader<'i> = NsReader<&'i [u8]>;

/// Where an element's name resolves to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ns {
    None,
    Atom,
    Sx,
    /// feedmesh's signature extension.
    Sig,
    Other,
}

fn ns_of(result: &ResolveResult<'_>) -> Ns {
    match result {
        ResolveResult::Unbound => Ns::None,
        ResolveResult::Bound(Namespace(uri)) => match *uri {
            ATOM_NS => Ns::Atom,
            FEEDSYNC_NS | SSE_NS => Ns::Sx,
            SIGNATURE_NS => Ns::Sig,
            _ => Ns::Other,
        },
        ResolveResult::Unknown(_) => Ns::Other,
    }
}

/// Reads a FeedSync feed (RSS 2.0 or Atom) from a complete document.
pub fn read_feed(bytes: &[u8]) -> Result<Feed, ReadError> {
    let body = bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes);
    let mut parser = Parser { input: body, problems: Vec::new() };
    match parser.feed() {
        Ok(feed) if parser.problems.is_empty() => Ok(feed),
        Ok(_) => Err(ReadError { problems: parser.problems }),
        Err(stop) => {
            parser.push(stop.offset, stop.kind);
            Err(ReadError { problems: parser.problems })
        }
    }
}

/// A problem that stops the read (malformed XML, a limit, too many problems).
struct Stop {
    offset: u64,
    kind: ProblemKind,
}

struct Parser<'i> {
    input: &'i [u8],
    problems: Vec<Problem>,
}

/// A parsed `<item>`/`<entry>`, before it is checked against the feed.
struct RawItem {
    offset: u64,
    sync: Option<RawSync>,
    content: Content,
    raw: Box<str>,
}

struct RawSync {
    version: Option<Version>,
    conflicts: Vec<Version>,
}

impl<'i> Parser<'i> {
    fn push(&mut self, offset: u64, kind: ProblemKind) {
        if self.problems.len() < limits::PROBLEMS_MAX {
            let line = line_of(self.input, offset);
            self.problems.push(Problem { line, kind });
        }
    }

    /// Records a semantic problem; stops the read once too many have been seen.
    fn problem(&mut self, offset: u64, kind: ProblemKind) -> Result<(), Stop> {
        self.push(offset, kind);
        if self.problems.len() >= limits::PROBLEMS_MAX {
            return Err(Stop { offset, kind: ProblemKind::TooManyProblems });
        }
        Ok(())
    }

    /// The next event, with where its element name resolves. An element whose prefix is not
    /// bound is malformed (XML Namespaces 1.0).
    fn next(&self, reader: &mut Reader<'i>) -> Result<(Ns, Event<'i>), Stop> {
        let offset = reader.buffer_position();
        match reader.read_resolved_event() {
            Ok((ResolveResult::Unknown(prefix), Event::Start(_) | Event::Empty(_) | Event::End(_))) => {
                Err(Stop {
                    offset,
                    kind: ProblemKind::Malformed(format!("unbound namespace prefix {:?}", prefix)),
                })
            }
            Ok((resolved, event)) => {
                // Every start tag's attributes must be well-formed and unique, also in content
                // we keep raw (quick-xml checks them only when asked).
                if let Event::Start(start) | Event::Empty(start) = &event {
                    for attr in start.attributes() {
                        if let Err(err) = attr {
                            return Err(Stop { offset, kind: ProblemKind::Malformed(err.to_string()) });
                        }
                    }
                }
                Ok((ns_of(&resolved), event))
            }
            Err(err) => Err(Stop {
                offset: reader.error_position().max(offset),
                kind: ProblemKind::Malformed(err.to_string()),
            }),
        }
    }

    /// The text of the element whose start tag was just read, up to its end tag; a child element
    /// is malformed here. At most 512 bytes (a signature is at most 454).
    fn text_only(&self, reader: &mut Reader<'i>) -> Result<String, Stop> {
        let mut text = String::new();
        loop {
            let offset = reader.buffer_position();
            let (_, event) = self.next(reader)?;
            match event {
                Event::Text(t) => {
                    // Hex digits need no unescaping; anything else fails the hex check.
                    text.push_str(&t.into_inner());
                }
                Event::End(_) => return Ok(text),
                Event::Comment(_) => {}
                Event::Eof => {
                    return Err(Stop {
                        offset,
                        kind: ProblemKind::Malformed("unexpected end of document".into()),
                    })
                }
                _ => {
                    return Err(Stop {
                        offset,
                        kind: ProblemKind::Signature("an element inside fms:signature".into()),
                    })
                }
            }
            if text.len() > 512 {
                return Err(Stop { offset, kind: ProblemKind::Signature(clip(&text)) });
            }
        }
    }

    /// Reads past the end of the element whose start tag was just read, checking what it holds
    /// (well-formed, prefixes bound, nesting within [`limits::DEPTH_MAX`]).
    fn skip(&self, reader: &mut Reader<'i>) -> Result<(), Stop> {
        let mut depth = 1usize;
        loop {
            let offset = reader.buffer_position();
            let (_, event) = self.next(reader)?;
            match event {
                Event::Start(_) => {
                    depth += 1;
                    if depth > limits::DEPTH_MAX {
                        return Err(Stop { offset, kind: ProblemKind::Limit("element nesting depth") });
                    }
                }
                Event::End(_) => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                Event::Eof => {
                    return Err(Stop {
                        offset,
                        kind: ProblemKind::Malformed("unexpected end of document".into()),
                    })
                }
                _ => {}
            }
        }
    }

    fn feed(&mut self) -> Result<Feed, Stop> {
        if self.input.len() > limits::FEED_BYTES_MAX {
            return Err(Stop { offset: 0, kind: ProblemKind::TooLarge { bytes: self.input.len() as u64 } });
        }
        let text = match std::str::from_utf8(self.input) {
            Ok(text) => text,
            Err(err) => return Err(Stop { offset: err.valid_up_to() as u64, kind: ProblemKind::NotUtf8 }),
        };
        // XML 1.0 Char: no C0 controls but tab, LF and CR; no U+FFFE or U+FFFF.
        if let Some(at) = text.find(|c: char| {
            (c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || c == '\u{fffe}' || c == '\u{ffff}'
        }) {
            let c = text[at..].chars().next().unwrap_or_default();
            return Err(Stop {
                offset: at as u64,
                kind: ProblemKind::Malformed(format!(
                    "character U+{:04X} is not allowed in XML",
                    u32::from(c)
                )),
            });
        }
        let mut reader: Reader<'i> = NsReader::from_reader(self.input);
        let config = reader.config_mut();
        config.check_end_names = true;
        config.check_comments = true;
        config.trim_text(false);
        config.expand_empty_elements = false;
        self.document(&mut reader)
    }

    fn document(&mut self, reader: &mut Reader<'i>) -> Result<Feed, Stop> {
        // Prolog.
        let (ns, root, offset) = loop {
            let offset = reader.buffer_position();
            let (ns, event) = self.next(reader)?;
            match event {
                Event::Decl(decl) => {
                    if let Some(Ok(encoding)) = decl.encoding() {
                        let encoding = encoding.to_ascii_lowercase();
                        if encoding != "utf-8" && encoding != "utf8" {
                            return Err(Stop { offset, kind: ProblemKind::Encoding(encoding) });
                        }
                    }
                }
                Event::Comment(_) | Event::PI(_) => {}
                Event::DocType(_) => return Err(Stop { offset, kind: ProblemKind::DocType }),
                Event::Text(text) if is_blank(&text) => {}
                Event::Start(start) => break (ns, start, offset),
                Event::Empty(_) => {
                    return Err(Stop { offset, kind: ProblemKind::NotAFeed("an empty root element".into()) })
                }
                Event::Eof => {
                    return Err(Stop { offset, kind: ProblemKind::NotAFeed("no root element".into()) })
                }
                _ => {
                    return Err(Stop {
                        offset,
                        kind: ProblemKind::Malformed("content before the root element".into()),
                    })
                }
            }
        };
        let root_local = root.local_name().as_ref().to_string();
        let dialect = match (ns, root_local.as_str()) {
            (Ns::None, "rss") => Dialect::Rss,
            (Ns::Atom, "feed") => Dialect::Atom,
            _ => {
                let name = root.name().as_ref().to_string();
                return Err(Stop { offset, kind: ProblemKind::NotAFeed(format!("root element <{name}>")) });
            }
        };
        let mut scope = NsScope::default();
        add_bindings(&mut scope, &root);
        let root_attrs = raw_attrs(&root);
        let root_name: Box<str> = utf8(root.name().as_ref());

        let mut envelope = Envelope { root_attrs, root_name, ..Envelope::default() };
        let feed = match dialect {
            Dialect::Atom => {
                envelope.item_name = qualified(&root, "entry");
                envelope.scope = Arc::new(scope);
                self.container(reader, dialect, envelope)?
            }
            Dialect::Rss => {
                // <rss> holds exactly one <channel> (and nothing else but blanks and comments).
                let mut feed = None;
                loop {
                    let offset = reader.buffer_position();
                    let (ns, event) = self.next(reader)?;
                    match event {
                        Event::Start(start) if ns == Ns::None && start.local_name().as_ref() == "channel" => {
                            if feed.is_some() {
                                return Err(Stop {
                                    offset,
                                    kind: ProblemKind::Structure("more than one <channel>".into()),
                                });
                            }
                            let mut scope = scope.clone();
                            add_bindings(&mut scope, &start);
                            let mut envelope = envelope.clone();
                            envelope.channel_attrs = raw_attrs(&start);
                            envelope.channel_name = utf8(start.name().as_ref());
                            envelope.item_name = qualified(&start, "item");
                            envelope.scope = Arc::new(scope);
                            feed = Some(self.container(reader, dialect, envelope)?);
                        }
                        Event::Start(_) => {
                            // Unknown children of <rss> are skipped (RSS 2.0 allows none).
                            self.skip(reader)?;
                        }
                        Event::End(_) => break,
                        Event::Eof => {
                            return Err(Stop {
                                offset,
                                kind: ProblemKind::Malformed("unexpected end of document".into()),
                            })
                        }
                        _ => {}
                    }
                }
                feed.ok_or(Stop { offset, kind: ProblemKind::Structure("<rss> without <channel>".into()) })?
            }
        };
        // Epilog: only blanks, comments and processing instructions.
        loop {
            let offset = reader.buffer_position();
            let (_, event) = self.next(reader)?;
            match event {
                Event::Eof => break,
                Event::Comment(_) | Event::PI(_) => {}
                Event::Text(text) if is_blank(&text) => {}
                _ => {
                    return Err(Stop {
                        offset,
                        kind: ProblemKind::Malformed("content after the root element".into()),
                    })
                }
            }
        }
        Ok(feed)
    }

    /// Reads the children of `<channel>` or `<feed>` up to its end tag.
    fn container(
        &mut self,
        reader: &mut Reader<'i>,
        dialect: Dialect,
        mut envelope: Envelope,
    ) -> Result<Feed, Stop> {
        let mut feed = Feed {
            dialect,
            envelope: Envelope::default(),
            sharing: None,
            items: Default::default(),
            plain: Vec::new(),
        };
        let item_local: &str = match dialect {
            Dialect::Rss => "item",
            Dialect::Atom => "entry",
        };
        let item_ns = match dialect {
            Dialect::Rss => Ns::None,
            Dialect::Atom => Ns::Atom,
        };
        let mut sharing_seen = false;
        loop {
            let offset = reader.buffer_position();
            let (ns, event) = self.next(reader)?;
            let empty = matches!(event, Event::Empty(_));
            match event {
                Event::Start(start) | Event::Empty(start)
                    if ns == item_ns && start.local_name().as_ref() == item_local =>
                {
                    let item = self.item(
                        reader,
                        &start,
                        empty,
                        offset,
                        item_ns,
                        item_local,
                        &envelope.scope,
                        false,
                    )?;
                    self.accept(&mut feed, item)?;
                }
                Event::Start(start) if ns == Ns::Sx && start.local_name().as_ref() == "sharing" => {
                    let sharing = self.sharing(reader, &start, false, offset)?;
                    self.set_sharing(&mut feed, sharing, &mut sharing_seen, offset)?;
                }
                Event::Empty(start) if ns == Ns::Sx && start.local_name().as_ref() == "sharing" => {
                    let sharing = self.sharing(reader, &start, true, offset)?;
                    self.set_sharing(&mut feed, sharing, &mut sharing_seen, offset)?;
                }
                Event::Start(_) => {
                    self.skip(reader)?;
                    envelope.head.push(self.slice(offset, reader.buffer_position()));
                }
                Event::End(_) => break,
                Event::Eof => {
                    return Err(Stop {
                        offset,
                        kind: ProblemKind::Malformed("unexpected end of document".into()),
                    })
                }
                Event::Text(text) if is_blank(&text) => {}
                // Text directly in <channel>/<feed> means nothing to RSS or Atom; kept trimmed.
                _ => envelope
                    .head
                    .push(self.slice(offset, reader.buffer_position()).trim_matches(is_xml_space).into()),
            }
        }
        feed.envelope = envelope;
        Ok(feed)
    }

    fn set_sharing(
        &mut self,
        feed: &mut Feed,
        sharing: Option<Sharing>,
        seen: &mut bool,
        offset: u64,
    ) -> Result<(), Stop> {
        if *seen {
            return self.problem(offset, ProblemKind::Structure("more than one sx:sharing".into()));
        }
        *seen = true;
        feed.sharing = sharing;
        Ok(())
    }

    /// Adds a parsed item to the feed, checking id uniqueness and the item count.
    fn accept(&mut self, feed: &mut Feed, item: RawItem) -> Result<(), Stop> {
        let Some(sync) = item.sync else {
            let position = feed.items.len() as u32;
            feed.plain.push(PlainItem { position, raw: item.raw, scope: item.content.scope.clone() });
            return Ok(());
        };
        let Some(version) = sync.version else {
            return Ok(());
        };
        if feed.items.contains_key(&version.id) {
            return self.problem(item.offset, ProblemKind::DuplicateId(version.id.to_string()));
        }
        if feed.items.len() >= limits::ITEMS_PER_FEED_MAX {
            return Err(Stop { offset: item.offset, kind: ProblemKind::Limit("items per feed") });
        }
        let normalized = normalize(version, sync.conflicts);
        if normalized.encoded_bound() > limits::ITEM_ENCODED_MAX {
            // Only the winner alone can be over: `normalize` keeps the conflicts that fit.
            return self
                .problem(item.offset, ProblemKind::Limit("encoded bytes per item (one sync message)"));
        }
        feed.items.insert(normalized.version.id.clone(), normalized);
        Ok(())
    }

    fn slice(&self, from: u64, to: u64) -> Box<str> {
        // Both offsets are event boundaries of a UTF-8 document, so they are char boundaries.
        String::from_utf8_lossy(&self.input[from as usize..to as usize]).into()
    }

    /// Reads one `<item>`/`<entry>` whose start tag was just read.
    #[allow(clippy::too_many_arguments)]
    fn item(
        &mut self,
        reader: &mut Reader<'i>,
        start: &BytesStart<'i>,
        empty: bool,
        offset: u64,
        item_ns: Ns,
        item_local: &str,
        scope: &Arc<NsScope>,
        in_conflicts: bool,
    ) -> Result<RawItem, Stop> {
        let attrs = raw_attrs(start);
        let mut inner = String::new();
        let mut sync: Option<RawSync> = None;
        if !empty {
            loop {
                let at = reader.buffer_position();
                if (at - offset) as usize > limits::ITEM_BYTES_MAX {
                    return Err(Stop { offset, kind: ProblemKind::Limit("bytes per item") });
                }
                let (ns, event) = self.next(reader)?;
                let child_empty = matches!(event, Event::Empty(_));
                match event {
                    Event::Start(child) | Event::Empty(child)
                        if ns == Ns::Sx && child.local_name().as_ref() == "sync" =>
                    {
                        if sync.is_some() {
                            if !child_empty {
                                self.skip(reader)?;
                            }
                            self.problem(
                                at,
                                ProblemKind::Structure("more than one sx:sync in an item".into()),
                            )?;
                            continue;
                        }
                        sync = Some(self.sync(
                            reader,
                            &child,
                            child_empty,
                            at,
                            item_ns,
                            item_local,
                            scope,
                            in_conflicts,
                        )?);
                    }
                    Event::Start(_) => {
                        self.skip(reader)?;
                        inner.push_str(&self.slice(at, reader.buffer_position()));
                    }
                    Event::End(_) => break,
                    Event::Eof => {
                        return Err(Stop {
                            offset: at,
                            kind: ProblemKind::Malformed("unexpected end of document".into()),
                        })
                    }
                    Event::Text(text) if is_blank(&text) => {}
                    _ => inner.push_str(&self.slice(at, reader.buffer_position())),
                }
            }
        }
        let end = reader.buffer_position();
        if (end - offset) as usize > limits::ITEM_BYTES_MAX {
            return Err(Stop { offset, kind: ProblemKind::Limit("bytes per item") });
        }
        let content = Content { attrs, inner: inner.into(), scope: scope.clone() };
        // What an item holds must be writable into any feed (references the reader passes through
        // raw, such as an undeclared entity, are caught here).
        if let Err(problem) = super::check_content(&content) {
            self.problem(offset, ProblemKind::Content(problem))?;
        }
        let raw = if sync.is_none() { self.slice(offset, end) } else { "".into() };
        let mut item = RawItem { offset, sync, content, raw };
        // The version's content is this item's content.
        if let Some(RawSync { version: Some(version), .. }) = &mut item.sync {
            version.content = Arc::new(item.content.clone());
        }
        Ok(item)
    }

    /// Reads `sx:sync` (history and conflicts) whose start tag was just read.
    #[allow(clippy::too_many_arguments)]
    fn sync(
        &mut self,
        reader: &mut Reader<'i>,
        start: &BytesStart<'i>,
        empty: bool,
        offset: u64,
        item_ns: Ns,
        item_local: &str,
        scope: &Arc<NsScope>,
        in_conflicts: bool,
    ) -> Result<RawSync, Stop> {
        let mut id: Option<String> = None;
        let mut updates: Option<String> = None;
        let mut deleted = false;
        let mut noconflicts = false;
        let mut ok = true;
        for attr in start.attributes() {
            let attr = match attr {
                Ok(attr) => attr,
                Err(err) => return Err(Stop { offset, kind: ProblemKind::Malformed(err.to_string()) }),
            };
            if attr.key.prefix().is_some() {
                continue;
            }
            let value = match attr.normalized_value(quick_xml::XmlVersion::Implicit1_0) {
                Ok(value) => value.into_owned(),
                Err(err) => return Err(Stop { offset, kind: ProblemKind::Malformed(err.to_string()) }),
            };
            match attr.key.local_name().as_ref() {
                "id" => id = Some(value),
                "updates" => updates = Some(value),
                "deleted" => match parse_bool(&value) {
                    Some(b) => deleted = b,
                    None => {
                        ok = false;
                        self.problem(offset, ProblemKind::Bool { attr: "deleted", text: clip(&value) })?;
                    }
                },
                "noconflicts" => match parse_bool(&value) {
                    Some(b) => noconflicts = b,
                    None => {
                        ok = false;
                        self.problem(offset, ProblemKind::Bool { attr: "noconflicts", text: clip(&value) })?;
                    }
                },
                _ => {}
            }
        }
        let id = match id {
            None => {
                self.problem(offset, ProblemKind::MissingId)?;
                None
            }
            Some(text) => match ItemId::new(&text) {
                Ok(id) => Some(id),
                Err(err) => {
                    self.problem(offset, ProblemKind::Model(err.to_string()))?;
                    None
                }
            },
        };
        let updates = match updates {
            None => {
                self.problem(offset, ProblemKind::MissingAttr { element: "sx:sync", attr: "updates" })?;
                None
            }
            Some(text) => match parse_count(&text) {
                Some(n) => Some(n),
                None => {
                    self.problem(offset, ProblemKind::Updates(clip(&text)))?;
                    None
                }
            },
        };

        let mut history: Vec<HistoryEntry> = Vec::new();
        let mut history_seen = false;
        let mut conflicts: Vec<Version> = Vec::new();
        let mut signature: Option<crate::signing::VersionSignature> = None;
        if !empty {
            loop {
                let at = reader.buffer_position();
                let (ns, event) = self.next(reader)?;
                let child_empty = matches!(event, Event::Empty(_));
                match event {
                    Event::Start(child) | Event::Empty(child)
                        if ns == Ns::Sx && child.local_name().as_ref() == "history" =>
                    {
                        if !child_empty {
                            self.skip(reader)?;
                        }
                        history_seen = true;
                        if history.len() >= limits::HISTORY_PER_VERSION_MAX {
                            return Err(Stop {
                                offset: at,
                                kind: ProblemKind::Limit("history entries per version"),
                            });
                        }
                        match self.history(&child, at)? {
                            Some(entry) => history.push(entry),
                            None => ok = false,
                        }
                    }
                    Event::Start(child) | Event::Empty(child)
                        if ns == Ns::Sx && child.local_name().as_ref() == "conflicts" =>
                    {
                        if in_conflicts {
                            if !child_empty {
                                self.skip(reader)?;
                            }
                            self.problem(at, ProblemKind::NestedConflicts)?;
                            ok = false;
                            continue;
                        }
                        if !child_empty {
                            self.conflicts(reader, item_ns, item_local, scope, &mut conflicts, &mut ok)?;
                        }
                    }
                    Event::Start(child) | Event::Empty(child)
                        if ns == Ns::Sig && child.local_name().as_ref() == "signature" =>
                    {
                        let text = if child_empty { String::new() } else { self.text_only(reader)? };
                        match crate::signing::VersionSignature::from_hex(&text) {
                            Some(sig) if signature.is_none() => signature = Some(sig),
                            _ => {
                                self.problem(at, ProblemKind::Signature(clip(&text)))?;
                                ok = false;
                            }
                        }
                    }
                    Event::Start(_) => {
                        // Other extension elements inside sx:sync are not part of this profile.
                        self.skip(reader)?;
                    }
                    Event::End(_) => break,
                    Event::Eof => {
                        return Err(Stop {
                            offset: at,
                            kind: ProblemKind::Malformed("unexpected end of document".into()),
                        })
                    }
                    _ => {}
                }
            }
        }
        if !history_seen {
            self.problem(offset, ProblemKind::MissingHistory)?;
            ok = false;
        }
        let version = match (ok, id, updates) {
            (true, Some(id), Some(updates)) => {
                if conflicts.iter().any(|c| c.id != id) {
                    self.problem(offset, ProblemKind::ConflictId(id.to_string()))?;
                    None
                } else {
                    Some(Version {
                        id,
                        updates,
                        deleted,
                        noconflicts,
                        history: Arc::from(history),
                        content: Arc::new(Content::empty()),
                        signature,
                    })
                }
            }
            _ => None,
        };
        Ok(RawSync { version, conflicts })
    }

    /// Reads the items inside `sx:conflicts` up to its end tag.
    fn conflicts(
        &mut self,
        reader: &mut Reader<'i>,
        item_ns: Ns,
        item_local: &str,
        scope: &Arc<NsScope>,
        out: &mut Vec<Version>,
        ok: &mut bool,
    ) -> Result<(), Stop> {
        loop {
            let at = reader.buffer_position();
            let (ns, event) = self.next(reader)?;
            let empty = matches!(event, Event::Empty(_));
            match event {
                Event::Start(child) | Event::Empty(child)
                    if ns == item_ns && child.local_name().as_ref() == item_local =>
                {
                    let item = self.item(reader, &child, empty, at, item_ns, item_local, scope, true)?;
                    match item.sync {
                        Some(RawSync { version: Some(version), .. }) => {
                            if out.len() >= limits::CONFLICTS_PER_ITEM_MAX {
                                return Err(Stop {
                                    offset: at,
                                    kind: ProblemKind::Limit("conflicts per item"),
                                });
                            }
                            out.push(version);
                        }
                        Some(RawSync { version: None, .. }) => *ok = false,
                        None => {
                            self.problem(at, ProblemKind::Structure("a conflict without sx:sync".into()))?;
                            *ok = false;
                        }
                    }
                }
                Event::Start(_) => {
                    self.skip(reader)?;
                }
                Event::End(_) => return Ok(()),
                Event::Eof => {
                    return Err(Stop {
                        offset: at,
                        kind: ProblemKind::Malformed("unexpected end of document".into()),
                    })
                }
                _ => {}
            }
        }
    }

    /// Parses the attributes of one `sx:history`. `None` (with a problem recorded) when invalid.
    fn history(&mut self, start: &BytesStart<'i>, offset: u64) -> Result<Option<HistoryEntry>, Stop> {
        let mut sequence: Option<String> = None;
        let mut when: Option<String> = None;
        let mut by: Option<String> = None;
        for attr in start.attributes() {
            let attr = attr.map_err(|err| Stop { offset, kind: ProblemKind::Malformed(err.to_string()) })?;
            if attr.key.prefix().is_some() {
                continue;
            }
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| Stop { offset, kind: ProblemKind::Malformed(err.to_string()) })?
                .into_owned();
            match attr.key.local_name().as_ref() {
                "sequence" => sequence = Some(value),
                "when" => when = Some(value),
                "by" => by = Some(value),
                _ => {}
            }
        }
        let mut ok = true;
        let sequence = match sequence {
            None => {
                self.problem(offset, ProblemKind::MissingAttr { element: "sx:history", attr: "sequence" })?;
                ok = false;
                0
            }
            Some(text) => match parse_count(&text) {
                Some(n) => n,
                None => {
                    self.problem(offset, ProblemKind::Sequence(clip(&text)))?;
                    ok = false;
                    0
                }
            },
        };
        let when = match when {
            None => None,
            Some(text) => match When::parse(&text) {
                Ok(when) => Some(when),
                Err(_) => {
                    self.problem(offset, ProblemKind::When(clip(&text)))?;
                    ok = false;
                    None
                }
            },
        };
        let by = match by {
            None => None,
            Some(text) => match Endpoint::new(&text) {
                Ok(by) => Some(by),
                Err(err) => {
                    self.problem(offset, ProblemKind::Model(err.to_string()))?;
                    ok = false;
                    None
                }
            },
        };
        if ok && when.is_none() && by.is_none() {
            self.problem(offset, ProblemKind::HistoryAnonymous)?;
            ok = false;
        }
        Ok(ok.then_some(HistoryEntry { sequence, when, by }))
    }

    /// Reads `sx:sharing` (the start tag was just read).
    fn sharing(
        &mut self,
        reader: &mut Reader<'i>,
        start: &BytesStart<'i>,
        empty: bool,
        offset: u64,
    ) -> Result<Option<Sharing>, Stop> {
        let mut since = None;
        let mut until = None;
        let mut expires = None;
        let mut ok = true;
        for attr in start.attributes() {
            let attr = attr.map_err(|err| Stop { offset, kind: ProblemKind::Malformed(err.to_string()) })?;
            if attr.key.prefix().is_some() {
                continue;
            }
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| Stop { offset, kind: ProblemKind::Malformed(err.to_string()) })?
                .into_owned();
            match attr.key.local_name().as_ref() {
                "since" => since = Some(value),
                "until" => until = Some(value),
                "expires" => match When::parse(&value) {
                    Ok(when) => expires = Some(when),
                    Err(_) => {
                        self.problem(offset, ProblemKind::When(clip(&value)))?;
                        ok = false;
                    }
                },
                _ => {}
            }
        }
        let window = match (since, until) {
            (Some(since), Some(until)) => Some((since, until)),
            (None, None) => None,
            _ => {
                self.problem(offset, ProblemKind::SharingWindow)?;
                ok = false;
                None
            }
        };
        let mut related = Vec::new();
        if !empty {
            loop {
                let at = reader.buffer_position();
                let (ns, event) = self.next(reader)?;
                let child_empty = matches!(event, Event::Empty(_));
                match event {
                    Event::Start(child) | Event::Empty(child)
                        if ns == Ns::Sx && child.local_name().as_ref() == "related" =>
                    {
                        if !child_empty {
                            self.skip(reader)?;
                        }
                        if related.len() >= limits::RELATED_MAX {
                            return Err(Stop {
                                offset: at,
                                kind: ProblemKind::Limit("sx:related per sx:sharing"),
                            });
                        }
                        match self.related(&child, at)? {
                            Some(r) => related.push(r),
                            None => ok = false,
                        }
                    }
                    Event::Start(_) => {
                        self.skip(reader)?;
                    }
                    Event::End(_) => break,
                    Event::Eof => {
                        return Err(Stop {
                            offset: at,
                            kind: ProblemKind::Malformed("unexpected end of document".into()),
                        })
                    }
                    _ => {}
                }
            }
        }
        Ok(ok.then_some(Sharing { window, expires, related }))
    }

    fn related(&mut self, start: &BytesStart<'i>, offset: u64) -> Result<Option<Related>, Stop> {
        let mut link = None;
        let mut kind = None;
        let mut title = None;
        for attr in start.attributes() {
            let attr = attr.map_err(|err| Stop { offset, kind: ProblemKind::Malformed(err.to_string()) })?;
            if attr.key.prefix().is_some() {
                continue;
            }
            let value = attr
                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| Stop { offset, kind: ProblemKind::Malformed(err.to_string()) })?
                .into_owned();
            match attr.key.local_name().as_ref() {
                "link" => link = Some(value),
                "type" => kind = Some(value),
                "title" => title = Some(value),
                _ => {}
            }
        }
        let link = match link {
            Some(link) if is_absolute_uri(&link) => link,
            Some(link) => {
                self.problem(offset, ProblemKind::RelatedLink(clip(&link)))?;
                return Ok(None);
            }
            None => {
                self.problem(offset, ProblemKind::MissingAttr { element: "sx:related", attr: "link" })?;
                return Ok(None);
            }
        };
        let kind = match kind.as_deref() {
            Some("complete") => RelatedKind::Complete,
            Some("aggregated") => RelatedKind::Aggregated,
            Some(other) => {
                self.problem(offset, ProblemKind::RelatedType(clip(other)))?;
                return Ok(None);
            }
            None => {
                self.problem(offset, ProblemKind::MissingAttr { element: "sx:related", attr: "type" })?;
                return Ok(None);
            }
        };
        Ok(Some(Related { link, kind, title }))
    }
}

/// Winner first, then conflicts best first, without duplicates: what a merge of the item with
/// itself yields. Documents from other implementations may order them otherwise.
fn normalize(version: Version, mut conflicts: Vec<Version>) -> Item {
    if conflicts.is_empty() {
        return Item::new(version);
    }
    conflicts.push(version);
    conflicts.sort_by(|a, b| compare(b, a));
    conflicts.dedup_by(|a, b| a == b);
    // A version another one subsumes (and is not its twin) goes, as a merge would drop it.
    let subsumed: Vec<bool> =
        conflicts.iter().map(|x| conflicts.iter().any(|y| x.subsumed_by(y) && !y.subsumed_by(x))).collect();
    let mut keep = subsumed.iter().map(|s| !s);
    conflicts.retain(|_| keep.next().unwrap_or(true));
    let winner = conflicts.remove(0);
    if winner.noconflicts {
        conflicts.clear();
    }
    // As a merge keeps them: the best that fit the item's bounds.
    let conflicts = crate::feedsync::merge::fit_conflicts(&winner, conflicts.iter());
    Item { version: winner, conflicts }
}

/// XML's white space: space, tab, LF, CR (not form feed or vertical tab).
fn is_xml_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

fn is_blank(text: &quick_xml::events::BytesText<'_>) -> bool {
    text.as_ref().chars().all(is_xml_space)
}

fn utf8(text: &str) -> Box<str> {
    text.into()
}

/// The qualified name for a sibling element `local` in the same namespace as `start`.
fn qualified(start: &BytesStart<'_>, local: &str) -> Box<str> {
    match start.name().prefix() {
        Some(prefix) => format!("{}:{local}", prefix.as_ref()).into(),
        None => local.into(),
    }
}

fn add_bindings(scope: &mut NsScope, start: &BytesStart<'_>) {
    for attr in start.attributes().flatten() {
        let Some(decl) = attr.key.as_namespace_binding() else {
            continue;
        };
        let prefix: Box<str> = match decl {
            PrefixDeclaration::Default => "".into(),
            PrefixDeclaration::Named(p) => utf8(p),
        };
        let uri = attr
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map(|v| v.into_owned())
            .unwrap_or_default();
        match scope.bindings.binary_search_by(|(p, _)| p.cmp(&prefix)) {
            Ok(i) => scope.bindings[i].1 = uri.into(),
            Err(i) => scope.bindings.insert(i, (prefix, uri.into())),
        }
    }
}

/// The raw attributes of a start tag, each as ` key="value"` exactly as escaped in the input.
fn raw_attrs(start: &BytesStart<'_>) -> Box<str> {
    let raw = start.attributes_raw();
    let trimmed = raw.trim_end_matches('/').trim_end();
    if trimmed.trim().is_empty() {
        return "".into();
    }
    format!(" {}", trimmed.trim_start()).into()
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// An integer >= 1 that fits u32, digits only.
fn parse_count(text: &str) -> Option<u32> {
    let text = text.trim();
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u32>().ok().filter(|&n| n >= 1)
}

/// `scheme ":" rest`, scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) (RFC 3986).
fn is_absolute_uri(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !text.chars().any(|c| c.is_whitespace())
}

fn clip(text: &str) -> String {
    let mut out: String = text.chars().take(64).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    out
}

/// 1-based line of a byte offset.
fn line_of(input: &[u8], offset: u64) -> u32 {
    let end = (offset as usize).min(input.len());
    1 + input[..end].iter().filter(|&&b| b == b'\n').count() as u32
}

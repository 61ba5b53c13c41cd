//! The FeedSync data model: item ids, endpoints, history entries, versions, items and feeds.
//!
//! A *version* is one `sx:sync` (without its conflicts) plus the item's content; an *item* is the
//! winning version plus the losing versions kept in `sx:conflicts`; a *feed* is an ordered set of
//! items plus whatever else the document holds (kept as raw XML so it survives a round trip).
//! Payloads sit behind `Arc`, so cloning a version or an item never copies content or history.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use indexmap::IndexMap;

use super::limits;
use super::FeedsyncError;

/// The `sx:sync/@id` of an item: unique in a feed, the same everywhere, never changed.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ItemId(Arc<str>);

impl ItemId {
    /// Checks the id against RFC 2141's NSS characters and [`limits::ID_BYTES_MAX`].
    pub fn new(text: &str) -> Result<Self, FeedsyncError> {
        validate_id(text)?;
        Ok(Self(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// RFC 2141 NSS: letters, digits, `()+,-.:=@;$_!*'`, reserved `/?#`, and `%` followed by two hex digits.
fn validate_id(text: &str) -> Result<(), FeedsyncError> {
    if text.is_empty() {
        return Err(FeedsyncError::IdEmpty);
    }
    if text.len() > limits::ID_BYTES_MAX {
        return Err(FeedsyncError::IdTooLong { len: text.len() });
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let ok = b.is_ascii_alphanumeric() || b"()+,-.:=@;$_!*'/?#".contains(&b);
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(|c| c.is_ascii_hexdigit());
            if !(hex(i + 1) && hex(i + 2)) {
                return Err(FeedsyncError::IdCharacter { id: text.into(), at: i });
            }
            i += 3;
            continue;
        }
        if !ok {
            return Err(FeedsyncError::IdCharacter { id: text.into(), at: i });
        }
        i += 1;
    }
    Ok(())
}

/// An endpoint id (`sx:history/@by`): who made a change. Not a person's name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint(Arc<str>);

impl Endpoint {
    pub fn new(text: &str) -> Result<Self, FeedsyncError> {
        if text.is_empty() {
            return Err(FeedsyncError::ByEmpty);
        }
        if text.len() > limits::BY_BYTES_MAX {
            return Err(FeedsyncError::ByTooLong { len: text.len() });
        }
        Ok(Self(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Equality with a pointer fast path: endpoints are usually shared `Arc`s.
    #[inline]
    pub(crate) fn same(&self, other: &Endpoint) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An instant (`sx:history/@when`) at full precision, plus the text it was read from when that text
/// is not what [`When::to_rfc3339`] would write (so a feed is written back exactly as read).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct When {
    unix_secs: i64,
    nanos: u32,
    text: Option<Box<str>>,
}

impl When {
    /// A `when` at whole seconds (how this project writes its own entries).
    pub fn from_unix_secs(unix_secs: i64) -> Result<Self, FeedsyncError> {
        // Years 0000..=9999 keep RFC 3339 formatting total.
        if !(limits::WHEN_SECS_MIN..=limits::WHEN_SECS_MAX).contains(&unix_secs) {
            return Err(FeedsyncError::WhenOutOfRange { unix_secs });
        }
        Ok(Self { unix_secs, nanos: 0, text: None })
    }

    /// Parses RFC 3339 (any offset, any fraction). Keeps the text when it is not canonical.
    pub fn parse(text: &str) -> Result<Self, FeedsyncError> {
        use time::format_description::well_known::Rfc3339;
        if text.len() > limits::WHEN_BYTES_MAX {
            return Err(FeedsyncError::WhenNotRfc3339 { text: truncate(text) });
        }
        let parsed = time::OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|_| FeedsyncError::WhenNotRfc3339 { text: truncate(text) })?;
        let unix_secs = parsed.unix_timestamp();
        if !(limits::WHEN_SECS_MIN..=limits::WHEN_SECS_MAX).contains(&unix_secs) {
            return Err(FeedsyncError::WhenNotRfc3339 { text: truncate(text) });
        }
        let mut when = Self { unix_secs, nanos: parsed.nanosecond(), text: None };
        if when.to_rfc3339() != text {
            when.text = Some(text.into());
        }
        Ok(when)
    }

    /// Rebuilds a `when` from its parts (as the wire carries it), checking them: the instant in
    /// range, nanoseconds below one second, and the text (if any) naming the same instant.
    pub fn from_parts(unix_secs: i64, nanos: u32, text: Option<&str>) -> Result<Self, FeedsyncError> {
        if !(limits::WHEN_SECS_MIN..=limits::WHEN_SECS_MAX).contains(&unix_secs) || nanos >= 1_000_000_000 {
            return Err(FeedsyncError::WhenOutOfRange { unix_secs });
        }
        match text {
            None => Ok(Self { unix_secs, nanos, text: None }),
            Some(text) => {
                let parsed = Self::parse(text)?;
                if (parsed.unix_secs, parsed.nanos) != (unix_secs, nanos) {
                    return Err(FeedsyncError::WhenNotRfc3339 { text: truncate(text) });
                }
                Ok(parsed)
            }
        }
    }

    /// The text as read, when it differs from what [`When::to_rfc3339`] would make of the instant.
    pub fn text_as_read(&self) -> Option<&str> {
        self.text.as_deref()
    }

    /// The same instant, truncated to whole seconds (how our own new entries are written).
    pub fn whole_seconds(&self) -> Self {
        Self { unix_secs: self.unix_secs, nanos: 0, text: None }
    }

    pub fn unix_secs(&self) -> i64 {
        self.unix_secs
    }

    pub fn nanos(&self) -> u32 {
        self.nanos
    }

    /// The text as read, or else `YYYY-MM-DDTHH:MM:SS[.fraction]Z` in UTC.
    pub fn to_rfc3339(&self) -> String {
        let mut out = Vec::with_capacity(32);
        self.write_rfc3339(&mut out);
        // Only ASCII digits and separators are written, or the (UTF-8) text as read.
        String::from_utf8(out).unwrap_or_default()
    }

    /// Appends [`When::to_rfc3339`] to `out` without formatting machinery or allocation: this
    /// runs for every history entry of every canonical encoding (fingerprints, tie-breaks).
    pub fn write_rfc3339(&self, out: &mut Vec<u8>) {
        if let Some(text) = &self.text {
            out.extend_from_slice(text.as_bytes());
            return;
        }
        // Days since 1970-01-01 to a proleptic Gregorian date (the civil-from-days algorithm of
        // H. Hinnant's `chrono`-compatible date algorithms), integer arithmetic only.
        let days = self.unix_secs.div_euclid(86_400);
        let secs = self.unix_secs.rem_euclid(86_400) as u32;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let two = |out: &mut Vec<u8>, value: u32| {
            out.extend_from_slice(&[b'0' + (value / 10) as u8, b'0' + (value % 10) as u8])
        };
        // Years are 0000..=9999 (`from_unix_secs` and `parse` check the range).
        let year = year.clamp(0, 9999) as u32;
        two(out, year / 100);
        two(out, year % 100);
        out.push(b'-');
        two(out, month);
        out.push(b'-');
        two(out, day);
        out.push(b'T');
        two(out, secs / 3_600);
        out.push(b':');
        two(out, secs / 60 % 60);
        out.push(b':');
        two(out, secs % 60);
        let digits = |out: &mut Vec<u8>, value: u32, width: u32| {
            for place in (0..width).rev() {
                out.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
            }
        };
        if self.nanos != 0 {
            out.push(b'.');
            let mut nanos = self.nanos;
            let mut width = 9;
            while nanos.is_multiple_of(10) {
                nanos /= 10;
                width -= 1;
            }
            digits(out, nanos, width);
        }
        out.push(b'Z');
    }

    /// Orders by instant only (the text is presentation).
    pub fn cmp_instant(&self, other: &When) -> Ordering {
        (self.unix_secs, self.nanos).cmp(&(other.unix_secs, other.nanos))
    }
}

impl fmt::Debug for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

/// One `sx:history` entry. At least one of `when` and `by` is present.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct HistoryEntry {
    pub sequence: u32,
    pub when: Option<When>,
    pub by: Option<Endpoint>,
}

impl HistoryEntry {
    /// Subsumption of history entries (FeedSync 3.2): `self` is subsumed by `other`.
    #[inline]
    pub fn subsumed_by(&self, other: &HistoryEntry) -> bool {
        match (&self.by, &other.by) {
            // The sequence first: it is cheap and usually decides.
            (Some(mine), Some(theirs)) => other.sequence >= self.sequence && theirs.same(mine),
            (Some(_), None) => false,
            (None, Some(_)) => false,
            (None, None) => {
                other.sequence == self.sequence
                    && match (&self.when, &other.when) {
                        (Some(a), Some(b)) => a.cmp_instant(b) == Ordering::Equal,
                        _ => false,
                    }
            }
        }
    }
}

impl HistoryEntry {
    /// Whether some entry of `history` subsumes this one.
    #[inline]
    pub fn known_in(&self, history: &[HistoryEntry]) -> bool {
        history.iter().any(|entry| self.subsumed_by(entry))
    }
}

/// The XML namespace bindings in scope where an item sits (inherited from `<rss>`, `<channel>` or
/// `<feed>`), so that its raw content can be written into another document correctly.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct NsScope {
    /// `(prefix, uri)`; the empty prefix is the default namespace. Sorted by prefix, unique.
    pub bindings: Vec<(Box<str>, Box<str>)>,
}

impl NsScope {
    pub fn uri(&self, prefix: &str) -> Option<&str> {
        self.bindings.binary_search_by(|(p, _)| (**p).cmp(prefix)).ok().map(|i| &*self.bindings[i].1)
    }
}

/// Everything of an item except its `sx:sync`: the raw attributes of the `<item>`/`<entry>` start
/// tag and its other children as raw XML (whitespace-only text between children is dropped).
#[derive(Clone, Debug)]
pub struct Content {
    pub attrs: Box<str>,
    pub inner: Box<str>,
    pub scope: Arc<NsScope>,
}

impl PartialEq for Content {
    /// Two contents are the same when their XML text is; the scope is where it came from.
    fn eq(&self, other: &Self) -> bool {
        self.attrs == other.attrs && self.inner == other.inner
    }
}
impl Eq for Content {}

impl Content {
    pub fn empty() -> Self {
        Self { attrs: "".into(), inner: "".into(), scope: Arc::new(NsScope::default()) }
    }
}

/// One version of an item: its sync metadata (without conflicts) and its content.
#[derive(Clone, Debug)]
pub struct Version {
    pub id: ItemId,
    pub updates: u32,
    pub deleted: bool,
    pub noconflicts: bool,
    /// Topmost (most recent) first. Never empty.
    pub history: Arc<[HistoryEntry]>,
    pub content: Arc<Content>,
    /// The signature of the device named in the topmost entry (signed mode; see
    /// [`crate::signing`]). Not part of the version's identity: equality, the winner rule and the
    /// canonical encoding ignore it. Any change to the version drops it.
    pub signature: Option<crate::signing::VersionSignature>,
}

/// The widest varint (a `u32` length or number), in bytes.
pub(crate) const VARINT: usize = 5;

impl Version {
    /// An upper bound of the version's wire encoding, in bytes: every length and number at its
    /// widest varint, a `when` at its longest text, the signature counted whether present or not.
    /// Items are bounded by it ([`limits::ITEM_ENCODED_MAX`]) so that one always fits in a sync
    /// message; it is cheap (no encoding) and independent of the wire code.
    pub fn encoded_bound(&self) -> usize {
        // sequence, when (secs, nanos, text), by
        let entry = VARINT + 1 + (10 + VARINT + 1 + VARINT + limits::WHEN_BYTES_MAX) + 1 + VARINT;
        let history: usize =
            self.history.iter().map(|h| entry + h.by.as_ref().map_or(0, |b| b.as_str().len())).sum();
        let scope: usize =
            self.content.scope.bindings.iter().map(|(p, u)| 2 * VARINT + p.len() + u.len()).sum();
        // id, updates, flags, history, attrs, inner, scope, signature
        VARINT
            + self.id.as_str().len()
            + VARINT
            + 1
            + VARINT
            + history
            + VARINT
            + self.content.attrs.len()
            + VARINT
            + self.content.inner.len()
            + VARINT
            + scope
            + 1
            + VARINT
            + crate::signing::SIGNATURE_BYTES_MAX
    }
}

impl PartialEq for Version {
    /// Same version: same `sx:sync` (id, updates, flags, history) and same content (the
    /// signature is an attestation of the version, not part of it).
    fn eq(&self, other: &Self) -> bool {
        // Cheapest and most telling first: the versions of one item share their id, so it goes
        // last, and a topmost sequence tells most of them apart.
        self.updates == other.updates
            && self.deleted == other.deleted
            && self.noconflicts == other.noconflicts
            && self.history.first().map(|h| h.sequence) == other.history.first().map(|h| h.sequence)
            && (Arc::ptr_eq(&self.history, &other.history) || self.history == other.history)
            && (Arc::ptr_eq(&self.content, &other.content) || self.content == other.content)
            && self.id == other.id
    }
}
impl Eq for Version {}

impl Version {
    /// The topmost history entry. `history` is never empty (checked on every construction path).
    pub fn topmost(&self) -> &HistoryEntry {
        &self.history[0]
    }

    /// Item subsumption: this version's topmost entry is subsumed by some entry of `other`'s
    /// history.
    #[inline]
    pub fn subsumed_by(&self, other: &Version) -> bool {
        self.topmost().known_in(&other.history)
    }

    /// Checks the invariants a version must hold whatever path built it.
    pub fn check_invariants(&self) -> Result<(), FeedsyncError> {
        self.check_structure()?;
        super::xml::check_content(&self.content)
            .map_err(|problem| FeedsyncError::Content { id: self.id.clone(), problem })
    }

    /// [`Version::check_invariants`] but the content check (an XML fragment parse, the
    /// expensive part), for what was checked whole before it was stored.
    pub fn check_structure(&self) -> Result<(), FeedsyncError> {
        if self.history.is_empty() {
            return Err(FeedsyncError::HistoryEmpty { id: self.id.clone() });
        }
        if self.history.len() > limits::HISTORY_PER_VERSION_MAX {
            return Err(FeedsyncError::HistoryTooLong { id: self.id.clone() });
        }
        if self.updates == 0 {
            return Err(FeedsyncError::UpdatesZero { id: self.id.clone() });
        }
        for entry in self.history.iter() {
            if entry.sequence == 0 {
                return Err(FeedsyncError::SequenceZero { id: self.id.clone() });
            }
            if entry.when.is_none() && entry.by.is_none() {
                return Err(FeedsyncError::HistoryAnonymous { id: self.id.clone() });
            }
        }
        Ok(())
    }
}

/// A synchronized item: the winning version and the losing versions kept as conflicts
/// (best first, by the winner rule; none of them equal to the winner or to each other).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub version: Version,
    pub conflicts: Vec<Version>,
}

impl Item {
    pub fn new(version: Version) -> Self {
        Self { version, conflicts: Vec::new() }
    }

    pub fn id(&self) -> &ItemId {
        &self.version.id
    }

    /// An upper bound of the item's wire encoding (winner and conflicts), in bytes.
    pub fn encoded_bound(&self) -> usize {
        VARINT
            + self.version.encoded_bound()
            + self.conflicts.iter().map(Version::encoded_bound).sum::<usize>()
    }

    pub fn check_invariants(&self) -> Result<(), FeedsyncError> {
        self.check(true)
    }

    /// [`Item::check_invariants`] but the content checks ([`Version::check_structure`]).
    pub fn check_structure(&self) -> Result<(), FeedsyncError> {
        self.check(false)
    }

    /// [`Item::check_invariants`] for an incoming item against `held`, the item this replica holds
    /// under its id (which holds the invariants): a version equal to one of `held`'s passed the
    /// version checks when it entered, and two such versions passed the pairwise ones, so only
    /// the versions `held` lacks are checked, and the pairs with one of them. A hot item that
    /// comes back with a few new versions costs those few. Same verdict as `check_invariants`.
    pub fn check_against(&self, held: Option<&Item>) -> Result<(), FeedsyncError> {
        let Some(held) = held.filter(|h| h.id() == self.id()) else { return self.check(true) };
        let all: Vec<&Version> = std::iter::once(&self.version).chain(&self.conflicts).collect();
        let new: Vec<bool> = all
            .iter()
            .map(|v| !std::iter::once(&held.version).chain(&held.conflicts).any(|h| h == *v))
            .collect();
        self.check_with(true, &new)
    }

    fn check(&self, content: bool) -> Result<(), FeedsyncError> {
        self.check_with(content, &[])
    }

    /// The checks, skipping the per-version ones of versions marked `false` in `new` (all are
    /// new when `new` is empty) and the pairs of two of them.
    fn check_with(&self, content: bool, new: &[bool]) -> Result<(), FeedsyncError> {
        let is_new = |k: usize| new.get(k).copied().unwrap_or(true);
        let version_ok = |k: usize, v: &Version| {
            if !is_new(k) {
                Ok(())
            } else if content {
                v.check_invariants()
            } else {
                v.check_structure()
            }
        };
        version_ok(0, &self.version)?;
        if self.conflicts.len() > limits::CONFLICTS_PER_ITEM_MAX {
            return Err(FeedsyncError::TooManyConflicts { id: self.id().clone() });
        }
        let bytes = self.encoded_bound();
        if bytes > limits::ITEM_ENCODED_MAX {
            return Err(FeedsyncError::TooLarge { id: self.id().clone(), bytes });
        }
        let mut previous: Option<&Version> = None;
        for (k, conflict) in self.conflicts.iter().enumerate() {
            version_ok(k + 1, conflict)?;
            if conflict.id != self.version.id {
                return Err(FeedsyncError::ConflictIdMismatch { id: self.id().clone() });
            }
            if *conflict == self.version {
                return Err(FeedsyncError::ConflictEqualsWinner { id: self.id().clone() });
            }
            if super::merge::beats(conflict, &self.version) {
                return Err(FeedsyncError::ConflictBeatsWinner { id: self.id().clone() });
            }
            if let Some(previous) = previous {
                if !super::merge::beats(previous, conflict) {
                    return Err(FeedsyncError::ConflictsUnordered { id: self.id().clone() });
                }
            }
            previous = Some(conflict);
        }
        // No version of the item is subsumed by another one that is not its twin: a merge drops
        // such a version (steps 3 and 4), so an item holding one merges differently depending on
        // the side it is on (found by the `wire_item` fuzz target). Indexed, not pairwise
        // (`merge::dominated`). (No two versions are equal here: the checks above refuse a conflict equal to the
        // winner or not strictly below the previous conflict.)
        let all: Vec<&Version> = std::iter::once(&self.version).chain(&self.conflicts).collect();
        let fresh = (0..all.len()).filter(|&k| is_new(k)).count();
        let subsumed = if all.len() < 2 {
            false
        } else if fresh == all.len() || fresh * all.len() > 1024 {
            super::merge::dominated(&all).contains(&true)
        } else {
            // Only pairs with a new version: old ones hold the invariant among themselves.
            let drops = |x: &Version, y: &Version| x.subsumed_by(y) && !y.subsumed_by(x);
            (0..all.len()).filter(|&k| is_new(k)).any(|k| {
                all.iter().enumerate().any(|(j, y)| j != k && (drops(all[k], y) || drops(y, all[k])))
            })
        };
        if subsumed {
            return Err(FeedsyncError::ConflictSubsumed { id: self.id().clone() });
        }
        Ok(())
    }
}

/// RSS 2.0 or Atom 1.0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dialect {
    Rss,
    Atom,
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Rss => "RSS",
            Dialect::Atom => "Atom",
        })
    }
}

/// `sx:related`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Related {
    pub link: String,
    pub kind: RelatedKind,
    pub title: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RelatedKind {
    Complete,
    Aggregated,
}

/// `sx:sharing`: bounds of a partial feed and links to related feeds.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Sharing {
    /// `since` and `until`: both or neither.
    pub window: Option<(String, String)>,
    pub expires: Option<When>,
    pub related: Vec<Related>,
}

/// An item without `sx:sync`: takes no part in sync, kept as raw XML where it stood.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PlainItem {
    /// How many synced items precede it in document order.
    pub position: u32,
    pub raw: Box<str>,
    pub scope: Arc<NsScope>,
}

/// The document around the items: root and channel start tags and other channel/feed children.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Envelope {
    /// Qualified names of the root (`rss`/`feed`), channel (RSS only) and item (`item`/`entry`)
    /// elements, as the document spelled them (an Atom feed may use a prefix).
    pub root_name: Box<str>,
    pub channel_name: Box<str>,
    pub item_name: Box<str>,
    /// Raw attributes of `<rss>` or `<feed>`, with any `xmlns:sx` removed (the writer declares it).
    pub root_attrs: Box<str>,
    /// Raw attributes of `<channel>` (RSS only).
    pub channel_attrs: Box<str>,
    /// Children of `<channel>`/`<feed>` other than items and `sx:sharing`, as raw XML, in order.
    pub head: Vec<Box<str>>,
    /// Bindings in scope for items (root plus channel declarations).
    pub scope: Arc<NsScope>,
}

/// A FeedSync feed: items in document order, keyed by id.
#[derive(Clone, Debug)]
pub struct Feed {
    pub dialect: Dialect,
    pub envelope: Envelope,
    pub sharing: Option<Sharing>,
    pub(crate) items: IndexMap<ItemId, Item>,
    pub plain: Vec<PlainItem>,
}

impl Feed {
    /// An empty feed of the given dialect, with a minimal valid envelope.
    pub fn new(dialect: Dialect) -> Self {
        let mut scope = NsScope::default();
        if dialect == Dialect::Atom {
            scope.bindings.push(("".into(), super::xml::ATOM_NS.into()));
        }
        let envelope = match dialect {
            Dialect::Rss => Envelope {
                root_name: "rss".into(),
                channel_name: "channel".into(),
                item_name: "item".into(),
                root_attrs: r#" version="2.0""#.into(),
                channel_attrs: "".into(),
                head: vec![
                    "<title>feedmesh</title>".into(),
                    "<link>urn:feedmesh</link>".into(),
                    "<description>feedmesh feed</description>".into(),
                ],
                scope: Arc::new(scope),
            },
            Dialect::Atom => Envelope {
                root_name: "feed".into(),
                channel_name: "".into(),
                item_name: "entry".into(),
                root_attrs: format!(r#" xmlns="{}""#, super::xml::ATOM_NS).into(),
                channel_attrs: "".into(),
                head: vec![
                    "<title>feedmesh</title>".into(),
                    "<id>urn:feedmesh</id>".into(),
                    "<updated>1970-01-01T00:00:00Z</updated>".into(),
                ],
                scope: Arc::new(scope),
            },
        };
        Self { dialect, envelope, sharing: None, items: IndexMap::new(), plain: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn item(&self, id: &ItemId) -> Option<&Item> {
        self.items.get(id)
    }

    /// Synced items in document order.
    pub fn items(&self) -> impl ExactSizeIterator<Item = &Item> {
        self.items.values()
    }

    /// Inserts or replaces an item (keeps its position when replacing).
    pub fn put(&mut self, item: Item) -> Result<(), FeedsyncError> {
        if !self.items.contains_key(item.id()) && self.items.len() >= limits::ITEMS_PER_FEED_MAX {
            return Err(FeedsyncError::TooManyItems);
        }
        self.items.insert(item.id().clone(), item);
        Ok(())
    }

    /// The synced items as a canonical, order-independent value: sorted by id. Two feeds hold the
    /// same FeedSync state exactly when their `canonical_items()` are equal.
    pub fn canonical_items(&self) -> Vec<&Item> {
        let mut items: Vec<&Item> = self.items.values().collect();
        items.sort_unstable_by(|a, b| a.id().cmp(b.id()));
        items
    }

    pub fn check_invariants(&self) -> Result<(), FeedsyncError> {
        for (id, item) in &self.items {
            if id != item.id() {
                return Err(FeedsyncError::ConflictIdMismatch { id: id.clone() });
            }
            item.check_invariants()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formatting-machinery version `write_rfc3339` replaced, kept as the oracle.
    fn reference(when: &When) -> String {
        let date = time::OffsetDateTime::from_unix_timestamp(when.unix_secs).unwrap();
        let mut out = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            date.year(),
            u8::from(date.month()),
            date.day(),
            date.hour(),
            date.minute(),
            date.second()
        );
        if when.nanos != 0 {
            out.push('.');
            out.push_str(format!("{:09}", when.nanos).trim_end_matches('0'));
        }
        out.push('Z');
        out
    }

    #[test]
    fn rfc3339_writer_matches_the_reference_and_parses_back() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let span = (limits::WHEN_SECS_MAX - limits::WHEN_SECS_MIN) as u64;
        let mut cases =
            vec![(limits::WHEN_SECS_MIN, 0), (limits::WHEN_SECS_MAX, 999_999_999), (0, 1), (0, 500)];
        for _ in 0..20_000 {
            let secs = limits::WHEN_SECS_MIN + (next() % span) as i64;
            let nanos = match next() % 3 {
                0 => 0,
                1 => (next() % 1_000) as u32 * 1_000_000,
                _ => (next() % 1_000_000_000) as u32,
            };
            cases.push((secs, nanos));
        }
        for (secs, nanos) in cases {
            let when = When { unix_secs: secs, nanos, text: None };
            let text = when.to_rfc3339();
            assert_eq!(text, reference(&when), "{secs}.{nanos}");
            let back = When::parse(&text).unwrap();
            assert_eq!((back.unix_secs, back.nanos, back.text), (secs, nanos, None));
        }
    }
}

//! The sync wire codec: serde + postcard, versioned, bounded, with typed decode errors. A
//! simulated node and a real one send exactly these bytes. Decoding arbitrary bytes never panics,
//! and every item that decodes is a valid FeedSync item (ids, endpoints, times, invariants).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::feedsync::{self, Content, Endpoint, HistoryEntry, Item, ItemId, NsScope, Version, When};
use crate::riblt::Symbol;

/// The wire format version this engine speaks (2: versions carry an optional signature; pushes
/// announce relayed changes by fingerprint; directory catch-up and refusal bodies. 3: version
/// signatures are bound to the folder, `signing::VERSION_SIGNATURE_DOMAIN` v2, so a version 2
/// peer's signatures would not verify; it is refused by version instead. 5: an item names its id
/// once and its endpoints once, in a table its history entries index: a FeedSync history holds an
/// entry per endpoint that wrote the item, a 64-hex-digit device id each, which made most of the
/// bytes of an item many devices write. 6: the initiator names, by hash, versions of its items
/// with conflicts (`Body::Hello::held`), so that the responder does not send them back, and the
/// responder likewise in `Changes` and `Diff`).
pub const WIRE_VERSION: u8 = 6;

/// Most endpoints one item's table may name. An item within [`feedsync::limits::ITEM_ENCODED_MAX`]
/// cannot name more (every history entry with an endpoint counts at least 64 bytes there).
pub const ENDPOINTS_PER_ITEM_MAX: usize = feedsync::limits::ITEM_ENCODED_MAX / 64;

/// Errors decoding a message. A peer's bytes produce these, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {len} bytes is over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("wire version {0} is not supported (this engine speaks {WIRE_VERSION})")]
    Version(u8),
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("trailing bytes after the message")]
    Trailing,
    #[error("over the limit of {0}")]
    Bound(&'static str),
    #[error("invalid item in message: {0}")]
    Item(String),
}

/// A fingerprint, digest or check value: always 8 bytes on the wire (a varint would take 10).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Fixed64(pub [u8; 8]);

impl From<u64> for Fixed64 {
    fn from(v: u64) -> Self {
        Self(v.to_le_bytes())
    }
}

impl From<Fixed64> for u64 {
    fn from(v: Fixed64) -> Self {
        u64::from_le_bytes(v.0)
    }
}

/// A coded symbol of the rateless IBLT: 8 bytes of sum, 4 of check, a zigzag varint count.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WireSymbol {
    pub sum: Fixed64,
    pub check: [u8; 4],
    pub count: i64,
}

impl From<Symbol> for WireSymbol {
    fn from(s: Symbol) -> Self {
        // The check is a 32-bit value (riblt keeps the high half zero).
        Self { sum: s.sum.into(), check: (s.check as u32).to_le_bytes(), count: s.count }
    }
}

impl From<WireSymbol> for Symbol {
    fn from(s: WireSymbol) -> Self {
        Self { sum: s.sum.into(), check: u64::from(u32::from_le_bytes(s.check)), count: s.count }
    }
}

/// A replica's log position on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WireCursor {
    pub epoch: u64,
    pub seq: u64,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WireWhen {
    pub secs: i64,
    pub nanos: u32,
    pub text: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WireEntry {
    pub sequence: u32,
    pub when: Option<WireWhen>,
    /// The entry's endpoint, as an index into its item's [`WireItem::endpoints`].
    pub by: Option<u32>,
}

#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WireVersion {
    pub updates: u32,
    /// bit 0 deleted, bit 1 noconflicts.
    pub flags: u8,
    pub history: Vec<WireEntry>,
    pub attrs: String,
    pub inner: String,
    /// Namespace bindings the content needs, `(prefix, uri)`.
    pub scope: Vec<(String, String)>,
    /// The signature (signed mode), as [`crate::signing::VersionSignature::to_bytes`].
    pub signature: Option<WireSignature>,
}

/// A version signature's bytes: a length-prefixed byte string of 64 bytes (the single form,
/// encoded exactly as before batch signatures existed) or a batch form of 99 to
/// [`crate::signing::SIGNATURE_BYTES_MAX`] bytes. The layout is checked by `from_wire`.
///
/// Batch signatures came without a new `WIRE_VERSION`: every message a version 4 peer could send
/// still decodes the same, and a message carrying a batch-signed version is one such a peer
/// refuses as undecodable (`WireError::Decode`), so a session between them fails cleanly instead
/// of every session failing by version.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WireSignature(pub Vec<u8>);

impl Serialize for WireSignature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for WireSignature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = WireSignature;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "at most {} bytes", crate::signing::SIGNATURE_BYTES_MAX)
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<WireSignature, E> {
                if v.len() > crate::signing::SIGNATURE_BYTES_MAX {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(WireSignature(v.to_vec()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<WireSignature, A::Error> {
                let mut bytes = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    if bytes.len() == crate::signing::SIGNATURE_BYTES_MAX {
                        return Err(serde::de::Error::invalid_length(bytes.len() + 1, &self));
                    }
                    bytes.push(b);
                }
                Ok(WireSignature(bytes))
            }
        }
        d.deserialize_bytes(Visit)
    }
}

/// One item (winner and conflicts) on the wire: its id and the endpoints its histories name, once
/// each, then its versions.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct WireItem {
    pub id: String,
    /// The endpoints the histories name, each once, in order of first appearance (winner first);
    /// at most [`ENDPOINTS_PER_ITEM_MAX`].
    pub endpoints: Vec<String>,
    pub version: WireVersion,
    pub conflicts: Vec<WireVersion>,
}

/// Changes from the sender's log after `from` (exclusive), in `epoch`: its own changes as items,
/// and the fingerprints of the changes it merged from others (`have`), which the receiver asks for
/// only if it lacks them (most arrived there by another path already).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Push {
    pub epoch: u64,
    pub from: u64,
    pub items: Vec<WireItem>,
    pub have: Vec<Fixed64>,
}

/// What a message says. See `sync.rs` for who sends what when.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Body {
    /// Initiator, first: its log position, set size and digest; its cursor of the responder's log
    /// and its changes since the responder's last acknowledgement (incremental), or the first
    /// coded symbols of its set (full reconciliation).
    Hello {
        log: WireCursor,
        count: u64,
        digest: Fixed64,
        cursor: Option<WireCursor>,
        push: Option<Push>,
        symbols: Vec<WireSymbol>,
        /// Versions of the initiator's items with conflicts, each as its `replica::version_hash`
        /// truncated to 64 bits, that the responder leaves out of what it sends (a hot item's
        /// state differs between any two replicas, so fingerprints never match it, while most
        /// of its versions reached both already): with a push, those that entered the
        /// initiator's log after `from` in the changes it announces; without, all of them. May
        /// be empty or partial (it only saves bytes).
        held: Vec<Fixed64>,
    },
    /// Responder: its changes since the initiator's cursor (`more`: another chunk follows), and
    /// (first chunk only) the pushed fingerprints it lacks, with those of the pushed `held`
    /// versions it holds (the initiator leaves them out of the wanted items); the initiator then
    /// sends those as `Items` and the responder closes with `Done`.
    Changes { log: WireCursor, items: Vec<WireItem>, more: bool, want: Vec<Fixed64>, held: Vec<Fixed64> },
    /// Responder: send coded symbols until there are `upto` in all.
    More { upto: u64 },
    /// Initiator: coded symbols starting at index `from`.
    Symbols { from: u64, symbols: Vec<WireSymbol> },
    /// Responder: decoded. The fingerprints of the initiator's items it wants, and a first chunk of
    /// its own items the initiator lacks; `held`: the version hashes of those of its items that
    /// have conflicts (all chunks), which the initiator leaves out of the items it sends back.
    Diff { log: WireCursor, want: Vec<Fixed64>, items: Vec<WireItem>, more: bool, held: Vec<Fixed64> },
    /// Either: a further chunk of items.
    Items { items: Vec<WireItem>, more: bool },
    /// Either: go on (answers a chunk with `more`).
    Continue,
    /// Responder: finished (the sets were equal, or the initiator's last items are merged); its log
    /// position and digest now.
    Done { log: WireCursor, digest: Fixed64 },
    /// Either: giving up.
    Abort { reason: crate::refusal::AbortCode },
    /// Authorized sessions, initiator first: the folder, its ticket and its directory heads.
    DirHello {
        folder: crate::directory::FolderId,
        ticket: crate::ticket::Ticket,
        heads: Vec<(crate::signing::DeviceId, u32)>,
    },
    /// Responder: its ticket, heads and the directory changes the initiator lacks (`complete`:
    /// all of them fit).
    DirSync {
        ticket: crate::ticket::Ticket,
        heads: Vec<(crate::signing::DeviceId, u32)>,
        changes: Vec<crate::directory::SignedChange>,
        complete: bool,
    },
    /// Initiator: the directory changes the responder lacks; feed messages follow.
    DirDone { changes: Vec<crate::directory::SignedChange>, complete: bool },
    /// Either: the session is refused (ticket or directory); nothing more will be accepted.
    Refused { reason: crate::refusal::RefusalCode },
}

impl Body {
    /// The message kind, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello { .. } => "Hello",
            Body::Changes { .. } => "Changes",
            Body::More { .. } => "More",
            Body::Symbols { .. } => "Symbols",
            Body::Diff { .. } => "Diff",
            Body::Items { .. } => "Items",
            Body::Continue => "Continue",
            Body::Done { .. } => "Done",
            Body::Abort { .. } => "Abort",
            Body::DirHello { .. } => "DirHello",
            Body::DirSync { .. } => "DirSync",
            Body::DirDone { .. } => "DirDone",
            Body::Refused { .. } => "Refused",
        }
    }

    /// The items the message carries (empty for bodies that carry none).
    pub fn items(&self) -> &[WireItem] {
        match self {
            Body::Hello { push: Some(push), .. } => &push.items,
            Body::Changes { items, .. } | Body::Diff { items, .. } | Body::Items { items, .. } => items,
            _ => &[],
        }
    }
}

/// One session message.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Message {
    pub version: u8,
    pub session: u64,
    pub step: u32,
    pub body: Body,
}

/// The header of a message (version, session, step, kind), read without decoding the body.
pub fn peek(bytes: &[u8]) -> Option<(u64, u32, &'static str)> {
    #[derive(Deserialize)]
    struct Header {
        version: u8,
        session: u64,
        step: u32,
        variant: u32,
    }
    let (h, _): (Header, _) = postcard::take_from_bytes(bytes).ok()?;
    if h.version != WIRE_VERSION {
        return None;
    }
    const KINDS: [&str; 13] = [
        "Hello", "Changes", "More", "Symbols", "Diff", "Items", "Continue", "Done", "Abort", "DirHello",
        "DirSync", "DirDone", "Refused",
    ];
    Some((h.session, h.step, KINDS.get(h.variant as usize)?))
}

/// Encodes a message.
pub fn encode(message: &Message) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_allocvec(message).unwrap_or_default()
}

/// The encoded size of a value (for budgeting chunks).
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    postcard::experimental::serialized_size(value).unwrap_or(usize::MAX)
}

/// Decodes a message of at most `max_bytes`.
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Message, WireError> {
    if bytes.len() > max_bytes {
        return Err(WireError::TooLarge { len: bytes.len(), max: max_bytes });
    }
    if let Some(&version) = bytes.first() {
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
    }
    let (message, rest): (Message, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Trailing);
    }
    Ok(message)
}

/// An item's endpoint table as it is built: each endpoint once, in order of first appearance.
/// A hash map by text (SipHash with a per-process key, so a peer's endpoints cannot be chosen to
/// collide): the same endpoint has a different shared text in each message it came in by, so
/// looking it up by pointer rarely hits. Its order reaches nothing: indices are assigned in order
/// of first appearance.
#[derive(Default)]
struct EndpointTable<'a> {
    by_text: std::collections::HashMap<&'a str, u32>,
    names: Vec<String>,
}

impl<'a> EndpointTable<'a> {
    fn index(&mut self, endpoint: &'a Endpoint) -> u32 {
        let text = endpoint.as_str();
        // An item holds far fewer distinct endpoints than u32::MAX (ENDPOINTS_PER_ITEM_MAX).
        let next = self.names.len() as u32;
        *self.by_text.entry(text).or_insert_with(|| {
            self.names.push(text.to_string());
            next
        })
    }
}

fn wire_version<'a>(v: &'a Version, table: &mut EndpointTable<'a>) -> WireVersion {
    WireVersion {
        updates: v.updates,
        flags: u8::from(v.deleted) | (u8::from(v.noconflicts) << 1),
        history: v
            .history
            .iter()
            .map(|h| WireEntry {
                sequence: h.sequence,
                when: h.when.as_ref().map(|w| WireWhen {
                    secs: w.unix_secs(),
                    nanos: w.nanos(),
                    text: w.text_as_read().map(str::to_string),
                }),
                by: h.by.as_ref().map(|b| table.index(b)),
            })
            .collect(),
        attrs: v.content.attrs.to_string(),
        inner: v.content.inner.to_string(),
        scope: v.content.scope.bindings.iter().map(|(p, u)| (p.to_string(), u.to_string())).collect(),
        signature: v.signature.as_ref().map(|s| WireSignature(s.to_bytes())),
    }
}

/// An item as it travels.
pub fn to_wire(item: &Item) -> WireItem {
    let mut table = EndpointTable::default();
    let version = wire_version(&item.version, &mut table);
    let conflicts = item.conflicts.iter().map(|c| wire_version(c, &mut table)).collect();
    WireItem { id: item.id().as_str().to_string(), endpoints: table.names, version, conflicts }
}

/// What many decoded items repeat, decoded once and shared: the endpoints that wrote them (one
/// per device, named in every history entry) and their namespace scopes (usually one per folder).
/// Sharing saves an allocation per entry and per item, and makes endpoint comparisons pointer
/// comparisons. Bounded: past [`Interner::ENDPOINTS_MAX`] endpoints or
/// [`Interner::SCOPES_MAX`] scopes, new ones are decoded unshared.
#[derive(Debug, Default)]
pub struct Interner {
    endpoints: std::collections::BTreeMap<Box<str>, Endpoint>,
    scopes: Vec<Arc<NsScope>>,
}

impl Interner {
    pub const ENDPOINTS_MAX: usize = 4096;
    pub const SCOPES_MAX: usize = 8;

    fn endpoint(&mut self, text: &str) -> Result<Endpoint, String> {
        if let Some(endpoint) = self.endpoints.get(text) {
            return Ok(endpoint.clone());
        }
        let endpoint = Endpoint::new(text).map_err(|e| e.to_string())?;
        if self.endpoints.len() < Self::ENDPOINTS_MAX {
            self.endpoints.insert(text.into(), endpoint.clone());
        }
        Ok(endpoint)
    }

    fn scope(&mut self, bindings: Vec<(Box<str>, Box<str>)>) -> Arc<NsScope> {
        if let Some(scope) = self.scopes.iter().find(|s| s.bindings == bindings) {
            return scope.clone();
        }
        let scope = Arc::new(NsScope { bindings });
        if self.scopes.len() < Self::SCOPES_MAX {
            self.scopes.push(scope.clone());
        }
        scope
    }
}

fn from_wire_version(
    w: &WireVersion,
    id: &ItemId,
    endpoints: &[Endpoint],
    shared: &mut Interner,
) -> Result<Version, String> {
    if w.flags > 3 {
        return Err(format!("unknown flags {}", w.flags));
    }
    if w.history.len() > feedsync::limits::HISTORY_PER_VERSION_MAX {
        return Err("too many history entries".into());
    }
    let mut history = Vec::with_capacity(w.history.len());
    for h in &w.history {
        let when = match &h.when {
            None => None,
            Some(t) => Some(When::from_parts(t.secs, t.nanos, t.text.as_deref()).map_err(|e| e.to_string())?),
        };
        let by = match h.by {
            None => None,
            Some(k) => Some(endpoints.get(k as usize).cloned().ok_or_else(|| {
                format!("a history entry names endpoint {k} of a table of {}", endpoints.len())
            })?),
        };
        history.push(HistoryEntry { sequence: h.sequence, when, by });
    }
    let signature = match &w.signature {
        None => None,
        Some(bytes) => Some(
            crate::signing::VersionSignature::from_bytes(&bytes.0)
                .ok_or_else(|| format!("a signature of {} bytes is neither form", bytes.0.len()))?,
        ),
    };
    let mut bindings: Vec<(Box<str>, Box<str>)> =
        w.scope.iter().map(|(p, u)| (p.as_str().into(), u.as_str().into())).collect();
    bindings.sort();
    bindings.dedup_by(|a, b| a.0 == b.0);
    let version = Version {
        id: id.clone(),
        updates: w.updates,
        deleted: w.flags & 1 != 0,
        noconflicts: w.flags & 2 != 0,
        history: Arc::from(history),
        content: Arc::new(Content {
            attrs: w.attrs.as_str().into(),
            inner: w.inner.as_str().into(),
            scope: shared.scope(bindings),
        }),
        signature,
    };
    // The content is checked once, with the whole item (`Item::check_invariants`).
    version.check_structure().map_err(|e| e.to_string())?;
    Ok(version)
}

/// A received item, checked: valid ids, endpoints and times, and every item invariant.
pub fn from_wire(w: &WireItem) -> Result<Item, WireError> {
    from_wire_in(w, &mut Interner::default())
}

/// [`from_wire`], sharing endpoints and scopes with the other items decoded through `shared`.
pub fn from_wire_in(w: &WireItem, shared: &mut Interner) -> Result<Item, WireError> {
    let item = from_wire_structure_in(w, shared)?;
    item.check_invariants().map_err(|e| WireError::Item(e.to_string()))?;
    Ok(item)
}

/// [`from_wire`] for an item read back from this device's own store, which was checked whole
/// (content included) before it was stored: everything but the content check, which is most of
/// the cost of loading a large store. Never for bytes from a peer.
pub fn from_own_store(w: &WireItem) -> Result<Item, WireError> {
    from_own_store_in(w, &mut Interner::default())
}

/// [`from_own_store`], sharing endpoints and scopes with the other items decoded through `shared`.
pub fn from_own_store_in(w: &WireItem, shared: &mut Interner) -> Result<Item, WireError> {
    let item = from_wire_structure_in(w, shared)?;
    item.check_structure().map_err(|e| WireError::Item(e.to_string()))?;
    Ok(item)
}

/// A received item decoded into the engine's types (ids, endpoints, times and each version's
/// structure checked) without the item-level checks or the content check: for checking the
/// signatures of a message ahead of the session that will take it (`transport::preverify`),
/// which decodes it again with [`from_wire`]. Nothing decoded this way may be merged.
pub fn from_wire_structure(w: &WireItem) -> Result<Item, WireError> {
    from_wire_structure_in(w, &mut Interner::default())
}

pub(crate) fn from_wire_structure_in(w: &WireItem, shared: &mut Interner) -> Result<Item, WireError> {
    if w.conflicts.len() > feedsync::limits::CONFLICTS_PER_ITEM_MAX {
        return Err(WireError::Item("too many conflicts".into()));
    }
    if w.endpoints.len() > ENDPOINTS_PER_ITEM_MAX {
        return Err(WireError::Bound("endpoints per item"));
    }
    let id = ItemId::new(&w.id).map_err(|e| WireError::Item(e.to_string()))?;
    let endpoints: Vec<Endpoint> =
        w.endpoints.iter().map(|e| shared.endpoint(e)).collect::<Result<_, _>>().map_err(WireError::Item)?;
    let version = from_wire_version(&w.version, &id, &endpoints, shared).map_err(WireError::Item)?;
    let conflicts = w
        .conflicts
        .iter()
        .map(|c| from_wire_version(c, &id, &endpoints, shared))
        .collect::<Result<Vec<_>, _>>()
        .map_err(WireError::Item)?;
    Ok(Item { version, conflicts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn items_round_trip() {
        let mut feed = feedsync::Feed::new(feedsync::Dialect::Atom);
        let id = ItemId::new("a").unwrap();
        let by = Endpoint::new("me").unwrap();
        let when = When::parse("2020-01-02T03:04:05.5+01:00").unwrap();
        feed.change(&id, &by, &when, &feedsync::Edit::default()).unwrap();
        let item = feed.item(&id).unwrap().clone();
        let back = from_wire(&to_wire(&item)).unwrap();
        assert_eq!(back, item);
        let message = Message {
            version: WIRE_VERSION,
            session: 7,
            step: 3,
            body: Body::Items { items: vec![to_wire(&item)], more: false },
        };
        assert_eq!(decode(&encode(&message), 1 << 20).unwrap(), message);
        assert_eq!(peek(&encode(&message)), Some((7, 3, "Items")));
    }

    #[test]
    fn items_decoded_together_share_endpoints_and_scopes() {
        let mut feed = feedsync::Feed::new(feedsync::Dialect::Atom);
        let by = Endpoint::new("me").unwrap();
        let when = When::from_unix_secs(1_000).unwrap();
        for id in ["a", "b"] {
            feed.change(&ItemId::new(id).unwrap(), &by, &when, &feedsync::Edit::default()).unwrap();
        }
        let wires: Vec<WireItem> = feed.items().map(to_wire).collect();
        let mut shared = Interner::default();
        let items: Vec<Item> = wires.iter().map(|w| from_wire_in(w, &mut shared).unwrap()).collect();
        let by_of = |i: &Item| i.version.history[0].by.clone().unwrap();
        assert!(std::ptr::eq(by_of(&items[0]).as_str().as_ptr(), by_of(&items[1]).as_str().as_ptr()));
        assert!(Arc::ptr_eq(&items[0].version.content.scope, &items[1].version.content.scope));
        // Decoded apart, they are equal but not shared; either way they equal the originals.
        let apart = from_wire(&wires[1]).unwrap();
        assert!(!std::ptr::eq(by_of(&items[0]).as_str().as_ptr(), by_of(&apart).as_str().as_ptr()));
        assert_eq!(apart, items[1]);
        assert_eq!(feed.items().cloned().collect::<Vec<_>>(), items);
    }

    /// A history names an endpoint per writer (64 hex digits for a device): the item carries
    /// each once, and the entries an index.
    #[test]
    fn an_item_names_each_endpoint_once() {
        let mut feed = feedsync::Feed::new(feedsync::Dialect::Atom);
        let id = ItemId::new("hot").unwrap();
        let writers: Vec<Endpoint> = (0..20).map(|k| Endpoint::new(&format!("{k:064x}")).unwrap()).collect();
        for (k, by) in writers.iter().enumerate() {
            let when = When::from_unix_secs(1_000 + k as i64).unwrap();
            feed.change(&id, by, &when, &feedsync::Edit::default()).unwrap();
        }
        let item = feed.item(&id).unwrap().clone();
        assert_eq!(item.version.history.len(), 20);
        let wire = to_wire(&item);
        assert_eq!(wire.endpoints.len(), 20);
        assert!(encoded_len(&wire) < 20 * 64 + 20 * 16 + 64, "{} bytes", encoded_len(&wire));
        assert_eq!(from_wire(&wire).unwrap(), item);
        // An entry naming an endpoint past the table is a typed error, not a panic.
        let mut bad = wire.clone();
        bad.version.history[0].by = Some(20);
        assert!(matches!(from_wire(&bad), Err(WireError::Item(_))));
        let mut bad = wire;
        bad.endpoints = vec![String::new(); ENDPOINTS_PER_ITEM_MAX + 1];
        assert_eq!(from_wire(&bad), Err(WireError::Bound("endpoints per item")));
    }

    #[test]
    fn the_interner_stays_within_its_bounds() {
        let mut shared = Interner::default();
        for i in 0..Interner::ENDPOINTS_MAX + 10 {
            shared.endpoint(&format!("e{i}")).unwrap();
        }
        assert_eq!(shared.endpoints.len(), Interner::ENDPOINTS_MAX);
        for i in 0..Interner::SCOPES_MAX + 3 {
            shared.scope(vec![(format!("p{i}").into(), "u".into())]);
        }
        assert_eq!(shared.scopes.len(), Interner::SCOPES_MAX);
        assert!(shared.endpoint(&"x".repeat(feedsync::limits::BY_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn limits_and_versions_are_typed_errors() {
        assert_eq!(decode(&[0u8; 100], 10), Err(WireError::TooLarge { len: 100, max: 10 }));
        assert_eq!(decode(&[9, 0, 0], 10), Err(WireError::Version(9)));
        let mut bytes = encode(&Message { version: WIRE_VERSION, session: 1, step: 0, body: Body::Continue });
        bytes.push(0);
        assert_eq!(decode(&bytes, 100), Err(WireError::Trailing));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(message) = decode(&bytes, 1 << 16) {
                if let Body::Items { items, .. } = &message.body {
                    for item in items {
                        let _ = from_wire(item);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_wire_items_are_checked(
            id in "[a-z]{0,4}", updates in 0u32..3, flags in 0u8..6, seq in 0u32..3,
            endpoints in proptest::collection::vec("[a-z]{0,3}", 0..3), by in proptest::option::of(0u32..4),
            secs in proptest::option::of(-1i64..3),
        ) {
            let item = WireItem {
                id,
                endpoints,
                version: WireVersion {
                    updates, flags,
                    history: vec![WireEntry { sequence: seq, when: secs.map(|s| WireWhen { secs: s * 1_000_000_000_000, nanos: 0, text: None }), by }],
                    attrs: String::new(), inner: String::new(), scope: vec![], signature: None,
                },
                conflicts: vec![],
            };
            if let Ok(decoded) = from_wire(&item) {
                decoded.check_invariants().unwrap();
            }
        }
    }
}

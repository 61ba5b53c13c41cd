//! How the store encodes an item, versioned on its own: a row is a version byte and then that
//! version's encoding. The wire's item type (`engine::wire::WireItem`) may change with the sync
//! protocol (`WIRE_VERSION`); the stored form does not change with it, so a wire change cannot
//! make a store unreadable. A new stored form gets a new version byte and a reader for the old
//! one.
//!
//! Version 1 has the same fields, in the same order, as the wire item of `WIRE_VERSION` 4, so
//! schema 4 rows (postcard of that wire item, with no version byte) became version 1 rows by
//! prefixing the byte (`Store::migrate`, schema 5). `WIRE_VERSION` 5 names an item's id and
//! endpoints once per item; version 1 rows keep them per version and per entry, and are
//! converted on the way in and out.

use engine::feedsync::Item;
use engine::wire::{from_wire, to_wire, WireEntry, WireItem, WireSignature, WireVersion, WireWhen};
use serde::{Deserialize, Serialize};

/// The stored form this build writes.
pub const ITEM_ENCODING: u8 = 1;

#[derive(Serialize, Deserialize)]
struct WhenV1 {
    secs: i64,
    nanos: u32,
    text: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct EntryV1 {
    sequence: u32,
    when: Option<WhenV1>,
    by: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct VersionV1 {
    id: String,
    updates: u32,
    flags: u8,
    history: Vec<EntryV1>,
    attrs: String,
    inner: String,
    scope: Vec<(String, String)>,
    /// postcard writes a `Vec<u8>` and a byte string alike (length, then the bytes), so reading
    /// it as bytes is the same format without a call per byte.
    #[serde(deserialize_with = "signature_bytes")]
    signature: Option<Vec<u8>>,
}

fn signature_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    Option::<WireSignature>::deserialize(d).map(|s| s.map(|s| s.0))
}

#[derive(Serialize, Deserialize)]
struct ItemV1 {
    version: VersionV1,
    conflicts: Vec<VersionV1>,
}

/// Why a stored row does not read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoredError {
    #[error("stored item encoding {0} is unknown to this build (written by a newer feedmesh?)")]
    Unknown(u8),
    #[error("stored item does not decode")]
    Corrupt,
}

fn version_v1(v: &WireVersion, id: &str, endpoints: &[String]) -> VersionV1 {
    VersionV1 {
        id: id.to_string(),
        updates: v.updates,
        flags: v.flags,
        history: v
            .history
            .iter()
            .map(|e| EntryV1 {
                sequence: e.sequence,
                when: e.when.as_ref().map(|w| WhenV1 { secs: w.secs, nanos: w.nanos, text: w.text.clone() }),
                // `to_wire` made the table: every index is in it.
                by: e.by.and_then(|k| endpoints.get(k as usize).cloned()),
            })
            .collect(),
        attrs: v.attrs.clone(),
        inner: v.inner.clone(),
        scope: v.scope.clone(),
        signature: v.signature.as_ref().map(|s| s.0.clone()),
    }
}

fn wire_version(v: VersionV1, endpoints: &mut Endpoints) -> Result<WireVersion, StoredError> {
    // Either form's bytes (the batch form came later, in the same field: version 1 rows hold
    // both); `from_wire` checks the layout.
    let signature = match v.signature {
        None => None,
        Some(bytes) if bytes.len() <= engine::signing::SIGNATURE_BYTES_MAX => Some(WireSignature(bytes)),
        Some(_) => return Err(StoredError::Corrupt),
    };
    Ok(WireVersion {
        updates: v.updates,
        flags: v.flags,
        history: v
            .history
            .into_iter()
            .map(|e| WireEntry {
                sequence: e.sequence,
                when: e.when.map(|w| WireWhen { secs: w.secs, nanos: w.nanos, text: w.text }),
                by: e.by.map(|by| endpoints.index(by)),
            })
            .collect(),
        attrs: v.attrs,
        inner: v.inner,
        scope: v.scope,
        signature,
    })
}

/// The endpoint table of a wire item, built from a row's per-entry endpoints.
#[derive(Default)]
struct Endpoints {
    index: std::collections::BTreeMap<String, u32>,
    names: Vec<String>,
}

impl Endpoints {
    fn index(&mut self, name: String) -> u32 {
        let next = self.names.len() as u32;
        *self.index.entry(name).or_insert_with_key(|name| {
            self.names.push(name.clone());
            next
        })
    }
}

/// The row for `item`.
pub fn encode(item: &Item) -> Vec<u8> {
    let wire = to_wire(item);
    let stored = ItemV1 {
        version: version_v1(&wire.version, &wire.id, &wire.endpoints),
        conflicts: wire.conflicts.iter().map(|c| version_v1(c, &wire.id, &wire.endpoints)).collect(),
    };
    let mut out = vec![ITEM_ENCODING];
    // Serialising plain data into a Vec cannot fail.
    out.extend(postcard::to_allocvec(&stored).unwrap_or_default());
    out
}

/// A row's item in wire form (the caller validates it with `from_wire`, or repairs it).
pub fn decode_wire(row: &[u8]) -> Result<WireItem, StoredError> {
    let (&version, rest) = row.split_first().ok_or(StoredError::Corrupt)?;
    match version {
        1 => {
            let stored: ItemV1 = postcard::from_bytes(rest).map_err(|_| StoredError::Corrupt)?;
            // One id per item on the wire: a row whose versions disagree is corrupt.
            let id = stored.version.id.clone();
            if stored.conflicts.iter().any(|c| c.id != id) {
                return Err(StoredError::Corrupt);
            }
            let mut endpoints = Endpoints::default();
            let version = wire_version(stored.version, &mut endpoints)?;
            let conflicts = stored
                .conflicts
                .into_iter()
                .map(|c| wire_version(c, &mut endpoints))
                .collect::<Result<_, _>>()?;
            Ok(WireItem { id, endpoints: endpoints.names, version, conflicts })
        }
        other => Err(StoredError::Unknown(other)),
    }
}

/// A row's item, validated.
pub fn decode(row: &[u8]) -> Result<Item, StoredError> {
    from_wire(&decode_wire(row)?).map_err(|_| StoredError::Corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `encode(&item())` as version 1 writes it: if this changes, version 1 changed, and stores
    /// written before cannot be read. Make a version 2 instead. (These are also the bytes of the
    /// schema 4 row of this item, after the version byte: postcard of the `WIRE_VERSION` 4 item,
    /// whose fields `ItemV1` keeps.)
    const PINNED: &str = "010178010001010180c49fd50c00000101650000000000";

    fn item() -> Item {
        let mut r = engine::replica::Replica::new(1);
        let id = engine::feedsync::ItemId::new("x").unwrap();
        let by = engine::feedsync::Endpoint::new("e").unwrap();
        let when = engine::feedsync::When::from_unix_secs(1_700_000_000).unwrap();
        r.change(&id, &by, &when, &engine::feedsync::Edit::default()).unwrap();
        (**r.item(&id).unwrap()).clone()
    }

    #[test]
    fn an_item_round_trips_through_its_row() {
        let item = item();
        assert_eq!(decode(&encode(&item)).unwrap(), item);
    }

    /// An item many endpoints wrote, with conflicts, reads back from its row (the row names the
    /// endpoints per entry, the wire item once per item).
    #[test]
    fn an_item_with_conflicts_and_many_writers_round_trips() {
        let id = engine::feedsync::ItemId::new("hot").unwrap();
        let when = engine::feedsync::When::from_unix_secs(1_700_000_000).unwrap();
        let mut r = engine::replica::Replica::new(1);
        for k in 0..6 {
            let mut w = engine::replica::Replica::new(2);
            let by = engine::feedsync::Endpoint::new(&format!("{k:064x}")).unwrap();
            w.change(&id, &by, &when, &engine::feedsync::Edit::default()).unwrap();
            r.merge(w.item(&id).unwrap()).unwrap();
        }
        let item = (**r.item(&id).unwrap()).clone();
        assert_eq!(item.conflicts.len(), 5);
        assert_eq!(decode(&encode(&item)).unwrap(), item);
    }

    #[test]
    fn version_1_rows_keep_their_bytes() {
        let row = encode(&item());
        assert_eq!(row.iter().map(|b| format!("{b:02x}")).collect::<String>(), PINNED);
    }

    #[test]
    fn batch_signed_items_round_trip_in_version_1_rows() {
        // The batch form lives in version 1's signature bytes: no new stored version was needed.
        let scope = engine::signing::FeedScope([3; 16]);
        let key = engine::signing::DeviceKey::from_bytes(&[4; 32]);
        let mut r = engine::replica::Replica::new_signed(1, scope);
        let when = engine::feedsync::When::from_unix_secs(1_700_000_000).unwrap();
        let changes: Vec<_> = (0..5)
            .map(|i| {
                (engine::feedsync::ItemId::new(&format!("i{i}")).unwrap(), engine::feedsync::Edit::default())
            })
            .collect();
        r.change_signed_many(&key, &when, &changes).unwrap();
        for item in r.items() {
            let row = encode(item);
            assert_eq!(row[0], 1);
            let back = decode(&row).unwrap();
            assert_eq!(back.version.signature, item.version.signature);
            engine::signing::verify_version(&back.version, &scope).unwrap();
        }
        // A signature longer than any form is a corrupt row, not an allocation.
        let mut wire = to_wire(r.items().next().unwrap());
        wire.version.signature = Some(WireSignature(vec![0; engine::signing::SIGNATURE_BYTES_MAX + 1]));
        let mut row = vec![1];
        row.extend(
            postcard::to_allocvec(&ItemV1 {
                version: version_v1(&wire.version, &wire.id, &wire.endpoints),
                conflicts: vec![],
            })
            .unwrap(),
        );
        assert_eq!(decode(&row), Err(StoredError::Corrupt));
    }

    #[test]
    fn an_unknown_encoding_is_refused_by_name() {
        let mut row = encode(&item());
        row[0] = 9;
        assert_eq!(decode(&row), Err(StoredError::Unknown(9)));
        assert_eq!(decode(&[]), Err(StoredError::Corrupt));
    }
}

//! Crash-safe storage shared by the node and the relay (redb: copy-on-write B-trees, each commit
//! durable before it returns).
//!
//! Tables: `meta` (schema version and kind), `blobs` (keys, settings), `directory` (the verified
//! directory log in the order it was applied, a causal order), `items` (every folder replica's
//! items in the store's own versioned encoding, [`crate::stored`], keyed by folder and item id),
//! and `usage` (per-device byte counters).
//! A database written by a newer schema is refused; older ones are migrated step by step.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use engine::directory::{Directory, FolderId, SignedChange, CHANGES_PER_BATCH_MAX};
use engine::feedsync::Item;
use engine::wire::{from_wire, WireItem};

use crate::stored;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

/// The schema this build writes.
pub const SCHEMA_VERSION: u64 = 6;

/// Blob set by the migration to schema 4 and cleared by [`Store::migrate_signatures`]: the stored
/// items carry version signatures of the old form (not bound to their folder).
const SIGNATURES_PENDING: &str = "signatures_v1_pending";

/// What [`Store::migrate_signatures`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignatureMigration {
    /// Items kept (some of their versions signed again).
    pub kept: u64,
    /// Items dropped (their winner was another device's and could not be signed again).
    pub dropped: u64,
}

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KIND: TableDefinition<&str, &str> = TableDefinition::new("kind");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blobs");
const DIRECTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("directory");
const ITEMS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("items");
/// Added in schema 2.
const USAGE: TableDefinition<&[u8], u64> = TableDefinition::new("usage");
/// Added in schema 3: the relay's HTTP bearer tokens, by hash.
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
/// Sealed chunk groups of cloud folders' files: folder (16) || root (32) || group (8, big
/// endian, so a file's groups sort in order) -> the sealed frame.
const CONTENT: TableDefinition<&[u8], &[u8]> = TableDefinition::new("content");
/// Per stored file: folder (16) || root (32) -> [`ObjectRecord`] (postcard).
const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// Bytes of sealed content each user keeps at the cloud (the quota's count): user -> bytes.
const CONTENT_USAGE: TableDefinition<&[u8], u64> = TableDefinition::new("content_usage");

/// A stored token record (encoded by its owner) under the token's hash.
pub type TokenRow = ([u8; 32], Vec<u8>);

/// Storage errors (typed so a caller can tell a locked database from a broken one).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the database is in use by another process (is a daemon running?)")]
    Locked,
    #[error("the database was written by a newer feedmesh (schema {found}, this build knows up to {known})")]
    TooNew { found: u64, known: u64 },
    #[error("the database belongs to a {found}, not a {expected}")]
    WrongKind { found: String, expected: String },
    #[error("stored {0} is corrupt")]
    Corrupt(&'static str),
    #[error(transparent)]
    Item(#[from] stored::StoredError),
    #[error("storage: {0}")]
    Db(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked,
            e => StoreError::Db(e.to_string()),
        }
    }
}

/// Writes a file only the owner can read (keys, tokens), durably.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates `path` empty with mode 0600 if it is missing (redb then initialises it), else takes
/// away every permission of group and others. Elsewhere than Unix, nothing.
fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        // Never truncate: an existing file is the database.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// One database file.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn item_key(folder: &FolderId, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + id.len());
    key.extend_from_slice(&folder.0);
    key.extend_from_slice(id.as_bytes());
    key
}

impl Store {
    /// Opens (creating or migrating) the database at `path` for a process of `kind`
    /// ("node" or "relay"). The file holds content, password and token hashes: it is created
    /// readable by its owner only (0600), and an existing one is made so.
    pub fn open(path: &Path, kind: &str) -> Result<Self, StoreError> {
        make_private(path).map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        let db = Database::create(path)?;
        let store = Self { db };
        store.migrate(kind)?;
        Ok(store)
    }

    /// The stored schema version (0 for a new file).
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let Ok(meta) = txn.open_table(META) else { return Ok(0) };
        Ok(meta.get("schema")?.map_or(0, |v| v.value()))
    }

    fn migrate(&self, kind: &str) -> Result<(), StoreError> {
        let found = self.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { found, known: SCHEMA_VERSION });
        }
        let txn = self.db.begin_write()?;
        {
            let mut kinds = txn.open_table(KIND)?;
            let stored = kinds.get("kind")?.map(|v| v.value().to_string());
            match stored {
                Some(k) if k != kind => {
                    return Err(StoreError::WrongKind { found: k, expected: kind.into() })
                }
                Some(_) => {}
                None => {
                    kinds.insert("kind", kind)?;
                }
            }
            let mut version = found;
            while version < SCHEMA_VERSION {
                match version {
                    // 0 -> 1: the first layout.
                    0 => {
                        txn.open_table(BLOBS)?;
                        txn.open_table(DIRECTORY)?;
                        txn.open_table(ITEMS)?;
                    }
                    // 1 -> 2: per-device usage counters (the relay's storage limit). Counts start
                    // from what is stored: nothing was attributed before, so zero.
                    1 => {
                        txn.open_table(USAGE)?;
                    }
                    // 2 -> 3: bearer tokens (before, they lived in memory only).
                    2 => {
                        txn.open_table(TOKENS)?;
                    }
                    // 3 -> 4: version signatures name their folder (signature v2). Stored items
                    // still carry v1 signatures; the owner re-signs what it can on open
                    // (`migrate_signatures`). The flag is written in this same transaction, so a
                    // crash cannot leave migrated tables without it.
                    3 => {
                        if found > 0 {
                            txn.open_table(BLOBS)?.insert(SIGNATURES_PENDING, [1u8].as_slice())?;
                        }
                    }
                    // 4 -> 5: items in the store's own encoding, versioned apart from the wire.
                    // Version 1 is the schema 4 row with its version byte in front.
                    4 => {
                        let mut table = txn.open_table(ITEMS)?;
                        let mut rows = Vec::new();
                        for entry in table.iter()? {
                            let (k, v) = entry?;
                            rows.push((k.value().to_vec(), v.value().to_vec()));
                        }
                        for (key, value) in rows {
                            let mut row = Vec::with_capacity(value.len() + 1);
                            row.push(1u8);
                            row.extend_from_slice(&value);
                            table.insert(key.as_slice(), row.as_slice())?;
                        }
                    }
                    // 5 -> 6: file content of cloud folders (Live Folders).
                    5 => {
                        txn.open_table(CONTENT)?;
                        txn.open_table(OBJECTS)?;
                        txn.open_table(CONTENT_USAGE)?;
                    }
                    _ => unreachable!("versions below SCHEMA_VERSION all have a step"),
                }
                version += 1;
            }
            txn.open_table(META)?.insert("schema", SCHEMA_VERSION)?;
        }
        txn.commit()?;
        Ok(())
    }

    pub fn get_blob(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(BLOBS)?;
        Ok(table.get(name)?.map(|v| v.value().to_vec()))
    }

    pub fn put_blob(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(BLOBS)?.insert(name, value)?;
        txn.commit()?;
        Ok(())
    }

    /// Appends directory changes (already applied, so in a causal order).
    pub fn save_changes(&self, changes: &[SignedChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(DIRECTORY)?;
            let first = table.last()?.map_or(0, |(k, _)| k.value() + 1);
            for (key, change) in (first..).zip(changes) {
                let bytes = postcard::to_allocvec(change).map_err(|_| StoreError::Corrupt("change"))?;
                table.insert(key, bytes.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// How many directory changes are stored.
    pub fn directory_len(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(DIRECTORY)?.len()?)
    }

    /// Rebuilds the directory, verifying every change again.
    pub fn load_directory(&self) -> Result<Directory, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DIRECTORY)?;
        let mut dir = Directory::new();
        let mut batch = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            let change: SignedChange =
                postcard::from_bytes(v.value()).map_err(|_| StoreError::Corrupt("directory change"))?;
            batch.push(change);
            if batch.len() == CHANGES_PER_BATCH_MAX {
                dir.apply(&batch).map_err(|_| StoreError::Corrupt("directory"))?;
                batch.clear();
            }
        }
        dir.apply(&batch).map_err(|_| StoreError::Corrupt("directory"))?;
        Ok(dir)
    }

    /// Saves items of `folder` in one transaction (durable when this returns).
    pub fn save_items<'a>(
        &self,
        folder: &FolderId,
        items: impl IntoIterator<Item = &'a Arc<Item>>,
    ) -> Result<usize, StoreError> {
        self.save_items_and_blobs(folder, items, &[])
    }

    /// Saves items and named blobs in one transaction: one logical write (an item and the outbox
    /// entry that says it is not acknowledged yet) is one commit, so a crash keeps both or
    /// neither.
    pub fn save_items_and_blobs<'a>(
        &self,
        folder: &FolderId,
        items: impl IntoIterator<Item = &'a Arc<Item>>,
        blobs: &[(&str, &[u8])],
    ) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let mut n = 0;
        {
            let mut table = txn.open_table(ITEMS)?;
            for item in items {
                let bytes = stored::encode(item);
                table.insert(item_key(folder, item.id().as_str()).as_slice(), bytes.as_slice())?;
                n += 1;
            }
            let mut table = txn.open_table(BLOBS)?;
            for (name, value) in blobs {
                table.insert(*name, *value)?;
            }
        }
        txn.commit()?;
        Ok(n)
    }

    /// Finishes the migration to schema 4, once: every stored item goes through `repair` (see
    /// `engine::signing::migrate_signatures`), which returns the item to keep or `None` to drop
    /// it; an item whose content no longer passes validation is dropped too. One transaction: a crash leaves the store as it was, and the next open repeats it.
    /// `None` when there was nothing to migrate.
    pub fn migrate_signatures(
        &self,
        mut repair: impl FnMut(&FolderId, &Item) -> Option<Item>,
    ) -> Result<Option<SignatureMigration>, StoreError> {
        if self.get_blob(SIGNATURES_PENDING)?.is_none() {
            return Ok(None);
        }
        let mut done = SignatureMigration::default();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ITEMS)?;
            let mut rows = Vec::new();
            for entry in table.iter()? {
                let (k, v) = entry?;
                rows.push((k.value().to_vec(), v.value().to_vec()));
            }
            for (key, value) in rows {
                let folder = FolderId(
                    key.get(..16).and_then(|f| f.try_into().ok()).ok_or(StoreError::Corrupt("item key"))?,
                );
                let wire: WireItem = stored::decode_wire(&value).map_err(StoreError::Item)?;
                // Content stored before it was checked at entry (issue 11) may no longer pass
                // validation: such an item is dropped like one that cannot be signed again.
                let repaired = from_wire(&wire).ok().and_then(|item| repair(&folder, &item));
                match repaired {
                    Some(kept) => {
                        let bytes = stored::encode(&kept);
                        table.insert(key.as_slice(), bytes.as_slice())?;
                        done.kept += 1;
                    }
                    None => {
                        table.remove(key.as_slice())?;
                        done.dropped += 1;
                    }
                }
            }
            txn.open_table(BLOBS)?.remove(SIGNATURES_PENDING)?;
        }
        txn.commit()?;
        Ok(Some(done))
    }

    /// Every stored item of `folder`, by id. What is stored was checked whole before it was
    /// stored, so rows are decoded without the content check (`wire::from_own_store`), a chunk
    /// of rows at a time on every core (`crate::verify_threads`): loading is most of a restart.
    pub fn load_items(&self, folder: &FolderId) -> Result<Vec<Item>, StoreError> {
        /// Rows read before they are decoded (bounds the raw bytes held at once).
        const CHUNK: usize = 16_384;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ITEMS)?;
        let lo = folder.0.to_vec();
        let mut hi = folder.0.to_vec();
        hi.push(0xff);
        let threads = crate::verify_threads();
        let mut out = Vec::new();
        let mut range = table.range::<&[u8]>(lo.as_slice()..hi.as_slice())?;
        // This thread reads chunk k + 1 while `threads` others decode chunk k: at most two
        // chunks of raw rows are held.
        std::thread::scope(|scope| -> Result<(), StoreError> {
            let mut decoding: Vec<std::thread::ScopedJoinHandle<'_, Result<Vec<Item>, StoreError>>> =
                Vec::new();
            loop {
                let mut rows: Vec<Vec<u8>> = Vec::with_capacity(CHUNK);
                for entry in range.by_ref().take(CHUNK) {
                    let (_, v) = entry?;
                    rows.push(v.value().to_vec());
                }
                for h in decoding.drain(..) {
                    out.extend(h.join().unwrap_or(Err(StoreError::Corrupt("item")))?);
                }
                if rows.is_empty() {
                    return Ok(());
                }
                let per = rows.len().div_ceil(threads).max(1);
                while !rows.is_empty() {
                    let part: Vec<Vec<u8>> = rows.drain(..per.min(rows.len())).collect();
                    decoding.push(scope.spawn(move || decode_rows(&part)));
                }
            }
        })?;
        Ok(out)
    }

    /// Folders that have stored items.
    pub fn folders(&self) -> Result<BTreeSet<FolderId>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ITEMS)?;
        let mut out = BTreeSet::new();
        // One seek per folder, not a walk over every item (a store can hold 10^6).
        let mut from = [0u8; 16];
        loop {
            let Some(entry) = table.range::<&[u8]>(from.as_slice()..)?.next() else { break };
            let (k, _) = entry?;
            let f: [u8; 16] =
                k.value().get(..16).and_then(|f| f.try_into().ok()).ok_or(StoreError::Corrupt("item key"))?;
            out.insert(FolderId(f));
            match u128::from_be_bytes(f).checked_add(1) {
                Some(next) => from = next.to_be_bytes(),
                None => break,
            }
        }
        Ok(out)
    }

    /// Adds `bytes` to a device's usage counter; returns the new total.
    pub fn add_usage(&self, device: &[u8; 32], bytes: u64) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let total;
        {
            let mut table = txn.open_table(USAGE)?;
            total = table.get(device.as_slice())?.map_or(0, |v| v.value()).saturating_add(bytes);
            table.insert(device.as_slice(), total)?;
        }
        txn.commit()?;
        Ok(total)
    }

    pub fn usage(&self, device: &[u8; 32]) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(USAGE)?;
        Ok(table.get(device.as_slice())?.map_or(0, |v| v.value()))
    }

    /// Stores a token record under its hash, and deletes others, in one transaction.
    pub fn put_token(&self, hash: &[u8; 32], record: &[u8], delete: &[[u8; 32]]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(TOKENS)?;
            table.insert(hash.as_slice(), record)?;
            for h in delete {
                table.remove(h.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    pub fn delete_tokens(&self, hashes: &[[u8; 32]]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(TOKENS)?;
            for h in hashes {
                table.remove(h.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every stored token record, by hash.
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let hash: [u8; 32] = k.value().try_into().map_err(|_| StoreError::Corrupt("token hash"))?;
            out.push((hash, v.value().to_vec()));
        }
        Ok(out)
    }

    /// Test hook: writes a schema version (to check that newer files are refused).
    #[doc(hidden)]
    pub fn force_schema_version(&self, version: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert("schema", version)?;
        txn.commit()?;
        Ok(())
    }

    /// Test hook: writes items as schemas up to 4 stored them (postcard of the wire item of
    /// `WIRE_VERSION` 4, no version byte), to check the migration.
    #[doc(hidden)]
    pub fn save_items_schema4<'a>(
        &self,
        folder: &FolderId,
        items: impl IntoIterator<Item = &'a Arc<Item>>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ITEMS)?;
            for item in items {
                let row = stored::encode(item);
                table.insert(item_key(folder, item.id().as_str()).as_slice(), &row[1..])?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// An item stored before items were bounded to fit a sync message
/// ([`engine::feedsync::limits::ITEM_ENCODED_MAX`]): it keeps the best conflicts that fit, as a
/// merge would. `None` if it is invalid otherwise, or its winner alone is too large.
/// Stored rows to items ([`Store::load_items`]).
fn decode_rows(rows: &[Vec<u8>]) -> Result<Vec<Item>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    let mut shared = engine::wire::Interner::default();
    for row in rows {
        let wire: WireItem = stored::decode_wire(row).map_err(StoreError::Item)?;
        match engine::wire::from_own_store_in(&wire, &mut shared) {
            Ok(item) => out.push(item),
            Err(_) => out.push(fit_stored(wire).ok_or(StoreError::Corrupt("item"))?),
        }
    }
    Ok(out)
}

fn fit_stored(mut wire: WireItem) -> Option<engine::feedsync::Item> {
    let alone = |version: &engine::wire::WireVersion| WireItem {
        id: wire.id.clone(),
        endpoints: wire.endpoints.clone(),
        version: version.clone(),
        conflicts: Vec::new(),
    };
    let winner_only = alone(&wire.version);
    let winner = from_wire(&winner_only).ok()?;
    wire.conflicts.truncate(engine::feedsync::limits::CONFLICTS_PER_ITEM_MAX);
    let conflicts: Vec<_> = wire
        .conflicts
        .iter()
        .map(|c| from_wire(&alone(c)).map(|i| i.version))
        .collect::<Result<_, _>>()
        .ok()?;
    let conflicts = engine::feedsync::merge::fit_conflicts(&winner.version, conflicts.iter());
    let item = engine::feedsync::Item { version: winner.version, conflicts };
    item.check_invariants().ok()?;
    tracing::warn!(id = %item.id(), "a stored item was over the size limit; kept the conflicts that fit");
    Some(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_schemas_and_other_kinds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, "node").unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        store.force_schema_version(SCHEMA_VERSION + 1).unwrap();
        drop(store);
        assert!(matches!(Store::open(&path, "node"), Err(StoreError::TooNew { .. })));
        let path2 = dir.path().join("db2.redb");
        drop(Store::open(&path2, "node").unwrap());
        assert!(matches!(Store::open(&path2, "relay"), Err(StoreError::WrongKind { .. })));
    }

    #[test]
    fn a_schema_1_file_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, "relay").unwrap();
        store.force_schema_version(1).unwrap();
        drop(store);
        let store = Store::open(&path, "relay").unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(store.add_usage(&[1; 32], 5).unwrap(), 5);
        assert_eq!(store.add_usage(&[1; 32], 7).unwrap(), 12);
        store.put_token(&[2; 32], b"record", &[]).unwrap();
        store.put_token(&[3; 32], b"other", &[[2; 32]]).unwrap();
        assert_eq!(store.tokens().unwrap(), vec![([3; 32], b"other".to_vec())]);
        store.delete_tokens(&[[3; 32]]).unwrap();
        assert!(store.tokens().unwrap().is_empty());
    }

    #[test]
    fn a_schema_4_store_keeps_its_items_in_the_versioned_encoding() {
        use engine::feedsync::{Edit, ItemId, When};
        use engine::replica::Replica;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let folder = FolderId([6; 16]);
        let mut r = Replica::new(1);
        let by = engine::feedsync::Endpoint::new("e").unwrap();
        let when = When::from_unix_secs(1_700_000_000).unwrap();
        for id in ["a", "b"] {
            r.change(&ItemId::new(id).unwrap(), &by, &when, &Edit::default()).unwrap();
        }
        let items: Vec<Arc<Item>> = r.items().cloned().collect();
        let store = Store::open(&path, "node").unwrap();
        store.save_items_schema4(&folder, items.iter()).unwrap();
        store.force_schema_version(4).unwrap();
        drop(store);
        let store = Store::open(&path, "node").unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let loaded: Vec<Item> = store.load_items(&folder).unwrap();
        assert_eq!(loaded, items.iter().map(|i| (**i).clone()).collect::<Vec<_>>());
        // Opening again changes nothing (the migration ran once).
        drop(store);
        let store = Store::open(&path, "node").unwrap();
        assert_eq!(store.load_items(&folder).unwrap().len(), 2);
    }

    /// Issue 11, defect 2: a schema 3 store holds versions whose signatures are not bound to a
    /// folder (stood in for here by signatures for another folder). On open, the node's own
    /// versions are signed again, another author's winner is dropped, and what verifies stays.
    #[test]
    fn a_schema_3_store_gets_folder_bound_signatures() {
        use engine::feedsync::{Edit, ItemId, When};
        use engine::replica::Replica;
        use engine::signing::{migrate_signatures, DeviceKey, FeedScope};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let folder = FolderId([5; 16]);
        let (mine, theirs) = (DeviceKey::from_bytes(&[1; 32]), DeviceKey::from_bytes(&[2; 32]));
        let when = When::from_unix_secs(1_700_000_000).unwrap();
        let write = |scope: FeedScope, id: &str, key: &DeviceKey| {
            let mut r = Replica::new_signed(1, scope);
            r.change_signed(&ItemId::new(id).unwrap(), key, &when, &Edit::default()).unwrap();
            let item = Arc::clone(r.items().next().unwrap());
            item
        };
        let old = FeedScope([9; 16]);
        let items =
            [write(old, "mine", &mine), write(old, "theirs", &theirs), write(folder.scope(), "ok", &theirs)];
        let store = Store::open(&path, "node").unwrap();
        store.save_items_schema4(&folder, items.iter()).unwrap();
        store.force_schema_version(3).unwrap();
        drop(store);
        let store = Store::open(&path, "node").unwrap();
        let repair = |f: &FolderId, item: &Item| migrate_signatures(item, &f.scope(), Some(&mine));
        let done = store.migrate_signatures(repair).unwrap();
        assert_eq!(done, Some(SignatureMigration { kept: 2, dropped: 1 }));
        assert_eq!(store.migrate_signatures(repair).unwrap(), None, "once");
        let mut replica = Replica::new_signed(2, folder.scope());
        let loaded: Vec<_> = store.load_items(&folder).unwrap().into_iter().map(Arc::new).collect();
        let ids: Vec<_> = loaded.iter().map(|i| i.id().as_str().to_string()).collect();
        assert_eq!(ids, ["mine", "ok"]);
        assert_eq!(replica.merge_all(&loaded, 1).unwrap(), 2, "every kept version verifies");
        // A store created new at schema 4 has nothing to migrate.
        let fresh = Store::open(&dir.path().join("new.redb"), "node").unwrap();
        assert_eq!(fresh.migrate_signatures(repair).unwrap(), None);
    }

    #[test]
    fn a_second_open_reports_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let _first = Store::open(&path, "node").unwrap();
        assert!(matches!(Store::open(&path, "node"), Err(StoreError::Locked)));
    }
}

/// What the cloud keeps of one file's content.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectRecord {
    /// The user whose quota it counts against (the folder's owner).
    pub user: [u8; 32],
    pub size: u64,
    /// The content key epoch every stored group is sealed with.
    pub epoch: u32,
    /// Groups stored so far, and their bytes.
    pub groups: u64,
    pub bytes: u64,
}

/// What [`Store::put_groups`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutGroups {
    /// Stored (groups already present are skipped); the user's usage after.
    Stored { used: u64 },
    /// Nothing stored: the groups would take the user past `quota`.
    OverQuota { used: u64 },
}

fn object_key(folder: &FolderId, root: &[u8; 32]) -> [u8; 48] {
    let mut key = [0u8; 48];
    key[..16].copy_from_slice(&folder.0);
    key[16..].copy_from_slice(root);
    key
}

fn group_key(folder: &FolderId, root: &[u8; 32], group: u64) -> [u8; 56] {
    let mut key = [0u8; 56];
    key[..48].copy_from_slice(&object_key(folder, root));
    key[48..].copy_from_slice(&group.to_be_bytes());
    key
}

fn decode_object(bytes: &[u8]) -> Result<ObjectRecord, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt("content object record"))
}

/// Cloud folders' content (the relay's side of Live Folders): sealed groups the cloud cannot
/// read, by folder, file root and group, with a per-user byte count for the quota.
impl Store {
    pub fn object(&self, folder: &FolderId, root: &[u8; 32]) -> Result<Option<ObjectRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OBJECTS)?;
        let row = table.get(object_key(folder, root).as_slice())?;
        row.map(|v| decode_object(v.value())).transpose()
    }

    /// The groups of `root` stored, as sorted disjoint runs.
    pub fn stored_runs(
        &self,
        folder: &FolderId,
        root: &[u8; 32],
    ) -> Result<Vec<std::ops::Range<u64>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONTENT)?;
        let (lo, hi) = (group_key(folder, root, 0), group_key(folder, root, u64::MAX));
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        // Bound: the groups of one file (its size / 16 KiB, checked when they were stored).
        for row in table.range(lo.as_slice()..=hi.as_slice())? {
            let (k, _) = row?;
            let k = k.value();
            let group =
                u64::from_be_bytes(k[48..56].try_into().map_err(|_| StoreError::Corrupt("content key"))?);
            match runs.last_mut() {
                Some(last) if last.end == group => last.end += 1,
                _ => runs.push(group..group + 1),
            }
        }
        Ok(runs)
    }

    /// Sealed groups `groups` of `root`, or `None` if any is missing.
    pub fn get_groups(
        &self,
        folder: &FolderId,
        root: &[u8; 32],
        groups: std::ops::Range<u64>,
    ) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONTENT)?;
        let mut out = Vec::new();
        // Bound: the caller's range (a request's groups, bounded by the protocol).
        for group in groups {
            match table.get(group_key(folder, root, group).as_slice())? {
                Some(v) => out.push(v.value().to_vec()),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// Stores sealed groups of `root` for `user` in one transaction, unless they would take the
    /// user's usage past `quota`. A record with another epoch is replaced (its groups dropped
    /// first): a file's groups are all sealed under one key.
    pub fn put_groups(
        &self,
        folder: &FolderId,
        root: &[u8; 32],
        fresh: &ObjectRecord,
        groups: &[(u64, Vec<u8>)],
        quota: u64,
    ) -> Result<PutGroups, StoreError> {
        let txn = self.db.begin_write()?;
        let outcome;
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let mut content = txn.open_table(CONTENT)?;
            let mut usage = txn.open_table(CONTENT_USAGE)?;
            let okey = object_key(folder, root);
            let mut record = match objects.get(okey.as_slice())? {
                Some(v) => decode_object(v.value())?,
                None => ObjectRecord { groups: 0, bytes: 0, ..fresh.clone() },
            };
            let mut used = usage.get(fresh.user.as_slice())?.map_or(0, |v| v.value());
            if record.epoch != fresh.epoch {
                let (lo, hi) = (group_key(folder, root, 0), group_key(folder, root, u64::MAX));
                content.retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)?;
                let owner = record.user;
                let was = usage.get(owner.as_slice())?.map_or(0, |v| v.value());
                usage.insert(owner.as_slice(), was.saturating_sub(record.bytes))?;
                if owner == fresh.user {
                    used = was.saturating_sub(record.bytes);
                }
                record = ObjectRecord { groups: 0, bytes: 0, ..fresh.clone() };
            }
            let mut added = 0u64;
            let mut new = Vec::new();
            for (group, sealed) in groups {
                let key = group_key(folder, root, *group);
                if content.get(key.as_slice())?.is_none() {
                    added += sealed.len() as u64;
                    new.push((key, sealed));
                }
            }
            if used.saturating_add(added) > quota && added > 0 {
                outcome = PutGroups::OverQuota { used };
            } else {
                for (key, sealed) in &new {
                    content.insert(key.as_slice(), sealed.as_slice())?;
                }
                record.groups += new.len() as u64;
                record.bytes += added;
                used = used.saturating_add(added);
                usage.insert(fresh.user.as_slice(), used)?;
                let bytes = postcard::to_allocvec(&record)
                    .map_err(|_| StoreError::Corrupt("content object record"))?;
                objects.insert(okey.as_slice(), bytes.as_slice())?;
                outcome = PutGroups::Stored { used };
            }
        }
        txn.commit()?;
        Ok(outcome)
    }

    /// Drops a stored file's content and gives its bytes back to its user's quota.
    pub fn delete_object(&self, folder: &FolderId, root: &[u8; 32]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let okey = object_key(folder, root);
            let record = match objects.remove(okey.as_slice())? {
                Some(v) => decode_object(v.value())?,
                None => return Ok(()),
            };
            let mut content = txn.open_table(CONTENT)?;
            let (lo, hi) = (group_key(folder, root, 0), group_key(folder, root, u64::MAX));
            content.retain_in(lo.as_slice()..=hi.as_slice(), |_, _| false)?;
            let mut usage = txn.open_table(CONTENT_USAGE)?;
            let was = usage.get(record.user.as_slice())?.map_or(0, |v| v.value());
            usage.insert(record.user.as_slice(), was.saturating_sub(record.bytes))?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Every stored file: (folder, root, record), in key order.
    pub fn objects(&self) -> Result<Vec<(FolderId, [u8; 32], ObjectRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OBJECTS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let k = k.value();
            if k.len() != 48 {
                return Err(StoreError::Corrupt("content object key"));
            }
            let mut folder = [0u8; 16];
            folder.copy_from_slice(&k[..16]);
            let mut root = [0u8; 32];
            root.copy_from_slice(&k[16..48]);
            out.push((FolderId(folder), root, decode_object(v.value())?));
        }
        Ok(out)
    }

    /// Bytes of sealed content `user` keeps at the cloud.
    pub fn content_usage(&self, user: &[u8; 32]) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CONTENT_USAGE)?;
        Ok(table.get(user.as_slice())?.map_or(0, |v| v.value()))
    }
}

//! A device's state: its key, the verified directory, one signed replica per mapped folder, what
//! it keeps per peer, and their persistence. Every local write is committed to redb before the
//! call returns (so before any caller acknowledges it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use engine::directory::{ChangeId, Directory, FolderId, Op, SignedChange, UserId};
use engine::feedsync::{Edit, Item, ItemId, When};
use engine::replica::{Replica, Seq};
use engine::signing::{hex, unhex, DeviceId, DeviceKey};
use engine::sync::Retained;
use engine::ticket::Ticket;
use serde::{Deserialize, Serialize};
use transport::store::Store;

/// Largest item text a `put` takes (CLI and local API), in bytes.
pub const TEXT_MAX: usize = 256 * 1024;

/// What `init` records: the cloud to use.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeConfig {
    /// The cloud's id (endpoint id and ticket key).
    pub cloud: DeviceId,
    pub relay_url: String,
    pub cloud_addrs: Vec<std::net::SocketAddr>,
    /// Extra CA certificate (PEM) for the relay's HTTPS (a self-signed relay).
    pub relay_ca_pem: Option<String>,
    /// The relay's QUIC address discovery port. Kept in its own record (`relay_qad_port`) so
    /// configs written before it existed still decode.
    #[serde(skip)]
    pub relay_qad_port: Option<u16>,
}

/// How a peer was last reached.
#[derive(Clone, Debug, Serialize, Default)]
pub struct PeerStatus {
    pub device: String,
    /// "lan", "direct", "relayed" or "unreachable".
    pub path: String,
    pub why: String,
    pub last_sync_unix: Option<i64>,
    pub last_outcome: String,
}

/// What a device refuses to do, with a stable code for the local API (`error`).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("item text is {len} bytes, over the limit of {} KiB", TEXT_MAX >> 10)]
    TextTooLarge { len: usize },
    #[error("you are not a member of folder {folder}")]
    NotMember { folder: String },
    #[error("folder {folder} is not mapped on this device: map it first (`feedmesh folder map {folder}`)")]
    NotMapped { folder: String },
}

impl Refused {
    pub fn code(&self) -> &'static str {
        match self {
            Refused::TextTooLarge { .. } => "text-too-large",
            Refused::NotMember { .. } => "not-a-member",
            Refused::NotMapped { .. } => "not-mapped",
        }
    }
}

/// The text limit, checked wherever text enters (CLI before it travels, local API, `put`).
pub fn check_text(text: &str) -> Result<(), Refused> {
    if text.len() > TEXT_MAX {
        return Err(Refused::TextTooLarge { len: text.len() });
    }
    Ok(())
}

/// A name that matched nothing (the directory may be behind: callers refresh it and retry).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

fn not_found(text: String) -> anyhow::Error {
    anyhow::Error::new(NotFound(text))
}

/// The device.
#[derive(Debug)]
pub struct Node {
    pub dir_path: PathBuf,
    pub key: DeviceKey,
    pub id: DeviceId,
    pub cfg: NodeConfig,
    store: Store,
    pub dir: Directory,
    saved_changes: BTreeSet<ChangeId>,
    pub replicas: BTreeMap<FolderId, Replica>,
    persisted: BTreeMap<FolderId, Seq>,
    pub retained: BTreeMap<(FolderId, DeviceId), Retained>,
    pub ticket: Option<Ticket>,
    pub peers: BTreeMap<DeviceId, PeerStatus>,
    /// Nonces this device sent for pairings it answered.
    pub pair_nonces: BTreeMap<u64, [u8; 32]>,
    pub cloud_online: bool,
    pub cloud_why: String,
    /// Items written here that the cloud has not acknowledged, per folder (persisted).
    pub outbox: BTreeMap<FolderId, BTreeSet<String>>,
    /// Errors of the last sync round.
    pub last_errors: Vec<String>,
    epoch: u64,
}

pub const KEY_FILE: &str = "device.key";
pub const DB_FILE: &str = "node.redb";
pub const API_FILE: &str = "api.json";

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    rand::fill(&mut b);
    b
}

/// Where a fresh `init` writes.
pub fn create(dir: &Path, cfg: &NodeConfig) -> anyhow::Result<DeviceKey> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key_path = dir.join(KEY_FILE);
    if key_path.exists() {
        bail!("{} is already initialised (it has {KEY_FILE})", dir.display());
    }
    let key = DeviceKey::from_bytes(&random32());
    let store = Store::open(&dir.join(DB_FILE), "node")?;
    store.put_blob("config", &postcard::to_allocvec(cfg)?)?;
    store.put_blob("relay_qad_port", &postcard::to_allocvec(&cfg.relay_qad_port)?)?;
    write_private(&key_path, &key.to_bytes())?;
    Ok(key)
}

/// Writes a file only the owner can read, durably.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    transport::store::write_private(path, bytes).with_context(|| format!("writing {}", path.display()))
}

impl Node {
    /// Opens the device in `dir` (fails with [`transport::store::StoreError::Locked`] inside the
    /// error chain when a daemon holds it).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let key_path = dir.join(KEY_FILE);
        let bytes = std::fs::read(&key_path)
            .with_context(|| format!("{} is not initialised (run `feedmesh init`)", dir.display()))?;
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|_| anyhow!("{}: not a 32-byte key", key_path.display()))?;
        let key = DeviceKey::from_bytes(&bytes);
        let store = Store::open(&dir.join(DB_FILE), "node")?;
        let mut cfg: NodeConfig = postcard::from_bytes(
            &store.get_blob("config")?.ok_or_else(|| anyhow!("the database has no config (re-run init)"))?,
        )
        .map_err(|_| anyhow!("stored config is corrupt"))?;
        if let Some(b) = store.get_blob("relay_qad_port")? {
            cfg.relay_qad_port =
                postcard::from_bytes(&b).map_err(|_| anyhow!("stored relay_qad_port is corrupt"))?;
        }
        let dir_log = store.load_directory()?;
        let saved_changes = dir_log.changes().map(|c| c.id()).collect();
        let pair_nonces = match store.get_blob("pair_nonces")? {
            Some(b) => postcard::from_bytes(&b).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        let outbox = match store.get_blob("outbox")? {
            Some(b) => postcard::from_bytes(&b).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        let epoch = u64::from_le_bytes(random32()[..8].try_into().expect("8 bytes"));
        // A store from before signature v2: sign this device's versions again for their folder.
        if let Some(m) = store.migrate_signatures(|folder, item| {
            engine::signing::migrate_signatures(item, &folder.scope(), Some(&key))
        })? {
            tracing::warn!(
                kept = m.kept,
                dropped = m.dropped,
                "migrated stored items to folder-bound signatures"
            );
        }
        let mut replicas = BTreeMap::new();
        let mut persisted = BTreeMap::new();
        for folder in store.folders()? {
            let mut replica = Replica::new_signed(epoch, folder.scope());
            replica.set_signers(Some(dir_log.signers(&folder)));
            let items: Vec<_> = store.load_items(&folder)?.into_iter().map(Arc::new).collect();
            replica
                .merge_all(&items, transport::verify_threads())
                .map_err(|e| anyhow!("stored item of {folder} failed verification: {e}"))?;
            persisted.insert(folder, replica.head());
            replicas.insert(folder, replica);
        }
        let id = DeviceId::of(&key);
        Ok(Self {
            dir_path: dir.to_path_buf(),
            key,
            id,
            cfg,
            store,
            dir: dir_log,
            saved_changes,
            replicas,
            persisted,
            retained: BTreeMap::new(),
            ticket: None,
            peers: BTreeMap::new(),
            pair_nonces,
            cloud_online: false,
            outbox,
            last_errors: Vec::new(),
            cloud_why: "this process has not reached it (is `feedmesh run` running?)".into(),
            epoch,
        })
    }

    pub fn user(&self) -> Option<UserId> {
        self.dir.user_of(&self.id)
    }

    /// Saves directory changes not yet stored.
    pub fn persist_directory(&mut self) -> anyhow::Result<usize> {
        let new: Vec<SignedChange> =
            self.dir.changes().filter(|c| !self.saved_changes.contains(&c.id())).cloned().collect();
        self.store.save_changes(&new)?;
        for c in &new {
            self.saved_changes.insert(c.id());
        }
        if !new.is_empty() {
            let folders: Vec<FolderId> = self.replicas.keys().copied().collect();
            for f in folders {
                let signers = self.dir.signers(&f);
                if let Some(r) = self.replicas.get_mut(&f) {
                    r.set_signers(Some(signers));
                }
            }
        }
        Ok(new.len())
    }

    /// Saves a folder's changed items; how many.
    pub fn persist_folder(&mut self, folder: &FolderId) -> anyhow::Result<usize> {
        self.persist_folder_with(folder, &[])
    }

    /// Saves the folder's changed items and `blobs` in one commit.
    fn persist_folder_with(&mut self, folder: &FolderId, blobs: &[(&str, &[u8])]) -> anyhow::Result<usize> {
        let Some(replica) = self.replicas.get(folder) else {
            self.store.save_items_and_blobs(folder, std::iter::empty(), blobs)?;
            return Ok(0);
        };
        let since = self.persisted.get(folder).copied().unwrap_or_default();
        let items: Vec<Arc<Item>> = if replica.head() <= since {
            Vec::new()
        } else {
            replica.log_since(since).map(|c| c.item.clone()).collect()
        };
        if items.is_empty() && blobs.is_empty() {
            return Ok(0);
        }
        let head = replica.head();
        let n = self.store.save_items_and_blobs(folder, items.iter(), blobs)?;
        self.persisted.insert(*folder, head);
        Ok(n)
    }

    /// The replica of a folder (created empty when the folder is mapped here).
    pub fn replica_mut(&mut self, folder: &FolderId) -> &mut Replica {
        let signers = self.dir.signers(folder);
        let epoch = self.epoch;
        self.replicas.entry(*folder).or_insert_with(|| {
            let mut r = Replica::new_signed(epoch, folder.scope());
            r.set_signers(Some(signers));
            r
        })
    }

    /// Makes a directory change with this device's key and stores it.
    pub fn make(&mut self, op: Op) -> anyhow::Result<SignedChange> {
        let change = self.dir.make(&self.key, transport::now_secs(), op).map_err(|e| anyhow!("{e}"))?;
        self.persist_directory()?;
        Ok(change)
    }

    /// Applies directory changes from the cloud or a peer.
    pub fn apply_directory(&mut self, changes: &[SignedChange]) -> anyhow::Result<usize> {
        let n = self.dir.apply(changes).map_err(|e| anyhow!("directory changes refused: {e}"))?;
        self.persist_directory()?;
        Ok(n)
    }

    /// Finds a folder visible to this device by name or hex id (prefix).
    pub fn folder(&self, name: &str) -> anyhow::Result<FolderId> {
        let folders = &self.dir.state().folders;
        let user = self.user();
        let visible =
            |f: &engine::directory::Folder| user.is_some_and(|u| self.dir.state().is_participant(f, &u));
        let by_name: Vec<FolderId> =
            folders.iter().filter(|(_, f)| f.name == name && visible(f)).map(|(id, _)| *id).collect();
        if by_name.len() == 1 {
            return Ok(by_name[0]);
        }
        if by_name.len() > 1 {
            bail!("{} folders are named {name:?}: use the id (`feedmesh folder ls`)", by_name.len());
        }
        // Invited but not yet a participant: by id only.
        let by_id: Vec<FolderId> = folders
            .keys()
            .filter(|id| hex(&id.0).starts_with(&name.to_lowercase()) && name.len() >= 4)
            .copied()
            .collect();
        match by_id.len() {
            1 => Ok(by_id[0]),
            0 => Err(not_found(format!("no folder {name:?} (see `feedmesh folder ls`)"))),
            n => bail!("{n} folders start with {name:?}"),
        }
    }

    /// Whether this device's user takes part in the folder (owner or active member).
    pub fn check_member(&self, folder: &FolderId) -> anyhow::Result<()> {
        let f = self.dir.folder(folder).ok_or_else(|| anyhow!("no such folder"))?;
        let member = self.user().is_some_and(|u| self.dir.state().is_participant(f, &u));
        if !member {
            return Err(Refused::NotMember { folder: f.name.clone() }.into());
        }
        Ok(())
    }

    /// [`Node::check_member`], and the folder is mapped here (it has a replica).
    pub fn check_mapped(&self, folder: &FolderId) -> anyhow::Result<()> {
        self.check_member(folder)?;
        let f = self.dir.folder(folder).ok_or_else(|| anyhow!("no such folder"))?;
        if !f.mapped.contains(&self.id) {
            return Err(Refused::NotMapped { folder: f.name.clone() }.into());
        }
        Ok(())
    }

    /// Finds a user by directory name, account-free (unique names) or hex id (prefix).
    pub fn find_user(&self, name: &str) -> anyhow::Result<UserId> {
        let users = &self.dir.state().users;
        let by_name: Vec<UserId> = users.iter().filter(|(_, u)| u.name == name).map(|(id, _)| *id).collect();
        if by_name.len() == 1 {
            return Ok(by_name[0]);
        }
        let by_id: Vec<UserId> = users
            .keys()
            .filter(|id| name.len() >= 4 && hex(&id.0).starts_with(&name.to_lowercase()))
            .copied()
            .collect();
        match (by_name.len(), by_id.len()) {
            (_, 1) => Ok(by_id[0]),
            (0, 0) => {
                Err(not_found(format!("no user {name:?} in the directory (has the cloud been reached?)")))
            }
            _ => bail!("{name:?} names more than one user: use the user id"),
        }
    }

    pub fn find_device(&self, name: &str) -> anyhow::Result<DeviceId> {
        let all: Vec<DeviceId> = self.dir.state().device_user.keys().copied().collect();
        let found: Vec<DeviceId> = all
            .into_iter()
            .filter(|d| name.len() >= 4 && hex(&d.0).starts_with(&name.to_lowercase()))
            .collect();
        match found.len() {
            1 => Ok(found[0]),
            0 => Err(not_found(format!("no device {name:?}"))),
            n => bail!("{n} devices start with {name:?}"),
        }
    }

    /// A local write: create/update/delete/resolve an item, signed, and durable on return.
    pub fn write(&mut self, folder: &FolderId, id: &str, edit: Edit) -> anyhow::Result<Arc<Item>> {
        self.check_mapped(folder)?;
        let id = ItemId::new(id).map_err(|e| anyhow!("item id: {e}"))?;
        let when = When::from_unix_secs(transport::now_secs()).map_err(|e| anyhow!("{e}"))?;
        let key = self.key.clone();
        let replica = self.replica_mut(folder);
        if edit.resolve && replica.item(&id).is_none() {
            bail!("no item {id} to resolve");
        }
        replica.change_signed(&id, &key, &when, &edit).map_err(|e| anyhow!("{e}"))?;
        let item = replica.item(&id).cloned().ok_or_else(|| anyhow!("item vanished"))?;
        self.outbox.entry(*folder).or_default().insert(id.as_str().to_string());
        // One commit for the item and its outbox entry (a crash between two commits stranded an
        // outbox entry, or lost one).
        let outbox = postcard::to_allocvec(&self.outbox)?;
        self.persist_folder_with(folder, &[("outbox", &outbox)])?;
        Ok(item)
    }

    /// Puts an item's text and title: what the CLI's `put` and the local API's `PUT` both do,
    /// with the same checks.
    pub fn put(
        &mut self,
        folder: &FolderId,
        id: &str,
        title: Option<&str>,
        text: &str,
    ) -> anyhow::Result<Arc<Item>> {
        check_text(text)?;
        self.write(folder, id, Edit { content: Some(content(title, text)), ..Edit::default() })
    }

    /// Deletes an item that exists and is not deleted yet: the CLI's `rm` and the local API's
    /// `DELETE` (which made a tombstone of any id before).
    pub fn remove(&mut self, folder: &FolderId, id: &str) -> anyhow::Result<Arc<Item>> {
        let fid = ItemId::new(id).map_err(|e| anyhow!("item id: {e}"))?;
        if self.replicas.get(folder).and_then(|r| r.item(&fid)).is_none_or(|i| i.version.deleted) {
            bail!("no item {id}");
        }
        self.write(folder, id, Edit { delete: true, ..Edit::default() })
    }

    pub fn save_pair_nonces(&self) -> anyhow::Result<()> {
        self.store.put_blob("pair_nonces", &postcard::to_allocvec(&self.pair_nonces)?)?;
        Ok(())
    }

    pub fn save_outbox(&self) -> anyhow::Result<()> {
        self.store.put_blob("outbox", &postcard::to_allocvec(&self.outbox)?)?;
        Ok(())
    }

    /// Items written here that the cloud has not acknowledged yet.
    pub fn pending(&self, folder: &FolderId) -> usize {
        self.outbox.get(folder).map_or(0, |s| s.len())
    }

    /// After a finished session with the cloud: items whose fingerprint is what it was when the
    /// session started are now in the cloud's replica.
    pub fn acknowledge(&mut self, folder: &FolderId, at_start: &BTreeMap<String, u64>) -> anyhow::Result<()> {
        let Some(replica) = self.replicas.get(folder) else { return Ok(()) };
        let Some(out) = self.outbox.get_mut(folder) else { return Ok(()) };
        out.retain(|id| {
            let now = ItemId::new(id).ok().and_then(|i| replica.fingerprint_of(&i));
            now.is_none() || now != at_start.get(id).copied()
        });
        if out.is_empty() {
            self.outbox.remove(folder);
        }
        self.save_outbox()
    }

    /// Fingerprints of the outbox items of `folder` now.
    pub fn outbox_fingerprints(&self, folder: &FolderId) -> BTreeMap<String, u64> {
        let (Some(replica), Some(out)) = (self.replicas.get(folder), self.outbox.get(folder)) else {
            return BTreeMap::new();
        };
        out.iter()
            .filter_map(|id| Some((id.clone(), replica.fingerprint_of(&ItemId::new(id).ok()?)?)))
            .collect()
    }
}

pub use transport::view::{content, title_and_body};

/// Parses a 16-byte folder id from hex.
pub fn parse_folder_hex(s: &str) -> Option<FolderId> {
    let b = unhex(s).filter(|b| b.len() == 16)?;
    let mut f = [0u8; 16];
    f.copy_from_slice(&b);
    Some(FolderId(f))
}

/// Parses a device id from hex.
pub fn parse_device_hex(s: &str) -> Option<DeviceId> {
    let b = unhex(s).filter(|b| b.len() == 32)?;
    let mut d = [0u8; 32];
    d.copy_from_slice(&b);
    Some(DeviceId(d))
}

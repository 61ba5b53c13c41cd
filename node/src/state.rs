//! A device's state: its key, the verified directory, one signed replica per mapped folder, what
//! it keeps per peer, and their persistence. Every local write is committed to redb before the
//! call returns (so before any caller acknowledges it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use engine::device::{Device, DeviceConfig, Identity, Persist};
use engine::directory::{Directory, FolderId, Op, SignedChange, UserId};
use engine::feedsync::{Edit, Item, ItemId, When};
use engine::replica::Replica;
use engine::signing::{hex, unhex, DeviceId, DeviceKey};
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

/// The device: the engine's device role ([`engine::device::Device`], which owns the directory,
/// the replicas, the ticket, the sessions and the control requests) and what only this binary
/// keeps beside it: the store, the outbox of unacknowledged writes, pairing nonces and what it
/// last saw of its peers.
#[derive(Debug)]
pub struct Node {
    pub dir_path: PathBuf,
    pub key: DeviceKey,
    pub id: DeviceId,
    pub cfg: NodeConfig,
    store: Store,
    pub device: Device<DeviceId>,
    pub peers: BTreeMap<DeviceId, PeerStatus>,
    /// Nonces this device sent for pairings it answered.
    pub pair_nonces: BTreeMap<u64, [u8; 32]>,
    pub cloud_online: bool,
    pub cloud_why: String,
    /// Items written here that the cloud has not acknowledged, per folder (persisted).
    pub outbox: BTreeMap<FolderId, BTreeSet<String>>,
    /// Errors of the last sync round.
    pub last_errors: Vec<String>,
    /// Mapped folders' files still needed here, for `status` (runtime only).
    pub needs: BTreeMap<FolderId, Vec<crate::folders::FileNeed>>,
    /// Chunk groups of content fetched and written since this process started.
    pub groups_fetched: u64,
    /// Per `cloud` folder, how its content stands at the cloud (last upload round).
    pub cloud_content: BTreeMap<FolderId, CloudContent>,
    /// The outbox's fingerprints when each running session with the cloud started, by session
    /// id: what a finished session acknowledges.
    at_start: BTreeMap<u64, (FolderId, BTreeMap<String, u64>)>,
    /// Items merged from peers, stored when a session ends ([`Node::sync_store`]) or before any
    /// write of this device's own, in one transaction per folder: a commit per message cost more
    /// than the rest of receiving it.
    merged: BTreeMap<FolderId, Vec<Arc<Item>>>,
}

/// What [`Node::commit`] stored.
#[derive(Debug, Default, Clone, Copy)]
pub struct Committed {
    /// Items from sessions with peers other than the cloud (to pass on to the cloud).
    pub from_peers: usize,
    pub items: usize,
    pub directory: usize,
}

pub const KEY_FILE: &str = "device.key";
pub const DB_FILE: &str = "node.redb";
pub const API_FILE: &str = "api.json";

pub fn random32() -> [u8; 32] {
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
        let pair_nonces = match store.get_blob("pair_nonces")? {
            Some(b) => postcard::from_bytes(&b).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        let outbox = match store.get_blob("outbox")? {
            Some(b) => postcard::from_bytes(&b).unwrap_or_default(),
            None => BTreeMap::new(),
        };
        // A new replica epoch on every start: peers' cursors into the last run's logs are void.
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
        let mut replicas = Vec::new();
        for folder in store.folders()? {
            let mut replica = Replica::new_signed(epoch, folder.scope());
            replica.set_signers(Some(dir_log.signers(&folder)));
            // Verified before it was stored: loaded as it is (`Replica::restore`).
            replica
                .restore(store.load_items(&folder)?.into_iter().map(Arc::new), transport::verify_threads())
                .map_err(|e| anyhow!("stored items of {folder}: {e}"))?;
            replicas.push((folder, replica));
        }
        let device = Device::new(
            Identity::Keyed { key: key.clone(), cloud: cfg.cloud },
            Some(cfg.cloud),
            dir_log,
            replicas,
            epoch,
            DeviceConfig {
                sync: std::sync::Arc::new(transport::stream_config()),
                // Control requests travel on reliable streams: a retry only covers a lost
                // connection.
                request_rto_us: 10_000_000,
                request_rto_max_us: 60_000_000,
                refresh_tickets: true,
                content: std::sync::Arc::new(crate::net::fetch_config(&DeviceId::of(&key))),
            },
        );
        let id = DeviceId::of(&key);
        Ok(Self {
            dir_path: dir.to_path_buf(),
            key,
            id,
            cfg,
            store,
            device,
            peers: BTreeMap::new(),
            pair_nonces,
            cloud_online: false,
            outbox,
            last_errors: Vec::new(),
            needs: BTreeMap::new(),
            groups_fetched: 0,
            cloud_content: BTreeMap::new(),
            cloud_why: "this process has not reached it (is `feedmesh run` running?)".into(),
            at_start: BTreeMap::new(),
            merged: BTreeMap::new(),
        })
    }

    /// The verified directory.
    pub fn dir(&self) -> &Directory {
        self.device.directory()
    }

    /// The replica of a folder held here.
    pub fn replica(&self, folder: &FolderId) -> Option<&Replica> {
        self.device.replica(folder)
    }

    /// The current ticket, if the cloud gave one in this run.
    pub fn ticket(&self) -> Option<&Ticket> {
        self.device.ticket()
    }

    pub fn user(&self) -> Option<UserId> {
        self.dir().user_of(&self.id)
    }

    /// Commits everything the device handed out to store (directory changes, merged and written
    /// items), each in one redb transaction, in the order handed out. The driver calls it before
    /// it sends anything the device polled after.
    pub fn commit(&mut self) -> anyhow::Result<Committed> {
        self.commit_with(None, &[])
    }

    /// [`Node::commit`]; a local write's commit of `folder` also stores `blobs` in its
    /// transaction.
    fn commit_with(
        &mut self,
        folder: Option<FolderId>,
        blobs: &[(&str, &[u8])],
    ) -> anyhow::Result<Committed> {
        let mut done = Committed::default();
        let mut blobs = Some(blobs).filter(|b| !b.is_empty());
        // Consecutive commits of one folder go into one transaction (a bulk write is one commit,
        // not one per item); the order of what is stored is the order handed out.
        let mut run: Option<(FolderId, Vec<Arc<Item>>, bool)> = None;
        loop {
            let next = self.device.poll_persist();
            let joins = match (&run, &next) {
                (Some((f, _, _)), Some(Persist::Items(c))) => *f == c.folder,
                _ => false,
            };
            if !joins {
                if let Some((f, items, local)) = run.take() {
                    let with = match (local, folder) {
                        (true, Some(mine)) if mine == f => blobs.take().unwrap_or(&[]),
                        _ => &[],
                    };
                    if local {
                        // This device's own writes: durable before the command returns, after
                        // what was merged before them (a later state of an item must not be
                        // overwritten by an earlier one).
                        self.sync_store()?;
                        self.store.save_items_and_blobs(&f, items.iter(), with)?;
                    } else {
                        // Merged from a peer: stored once per session, not once per message.
                        // A crash before loses at most these, which no one was told are kept
                        // (a device acknowledges nothing it merges; a restarted one forgets its
                        // cursors), so the peer sends them again.
                        self.merged.entry(f).or_default().extend(items);
                    }
                }
            }
            match next {
                None => break,
                Some(Persist::Directory(changes)) => {
                    self.store.save_changes(&changes)?;
                    done.directory += changes.len();
                }
                Some(Persist::Items(c)) => {
                    done.items += c.items.len();
                    if c.from.is_some_and(|p| p != self.cfg.cloud) {
                        done.from_peers += c.items.len();
                    }
                    let entry = run.get_or_insert_with(|| (c.folder, Vec::new(), false));
                    entry.2 |= c.from.is_none();
                    entry.1.extend(c.items.into_iter().map(|(item, _)| item));
                }
            }
        }
        if let Some(blobs) = blobs {
            for (name, bytes) in blobs {
                self.store.put_blob(name, bytes)?;
            }
        }
        Ok(done)
    }

    /// Stores the items merged from peers since the last time (the driver calls it when a
    /// session ends).
    pub fn sync_store(&mut self) -> anyhow::Result<()> {
        while let Some((folder, items)) = self.merged.pop_first() {
            if let Err(e) = self.store.save_items(&folder, items.iter()) {
                self.merged.insert(folder, items);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Makes a directory change with this device's key and stores it.
    pub fn make(&mut self, op: Op) -> anyhow::Result<SignedChange> {
        let change = self.device.make(transport::now_secs(), op).map_err(|e| anyhow!("{e}"))?;
        self.commit()?;
        Ok(change)
    }

    /// Applies directory changes from the cloud or a peer.
    pub fn apply_directory(&mut self, changes: &[SignedChange]) -> anyhow::Result<usize> {
        let n = self
            .device
            .directory_mut()
            .apply(changes)
            .map_err(|e| anyhow!("directory changes refused: {e}"))?;
        self.device.flush();
        self.commit()?;
        Ok(n)
    }

    /// Adds a paired device to this device's user (the existing device's approval) and stores
    /// the change.
    pub fn add_paired_device(
        &mut self,
        user: UserId,
        commitment: [u8; 32],
        pairing: engine::directory::Pairing,
        code: u32,
    ) -> anyhow::Result<()> {
        let key = self.key.clone();
        let now = transport::now_secs();
        self.device
            .directory_mut()
            .add_paired_device(&key, user, commitment, pairing, code, now)
            .map_err(|e| anyhow!("{e}"))?;
        self.device.flush();
        self.commit()?;
        Ok(())
    }

    /// Finds a folder visible to this device by name or hex id (prefix).
    pub fn folder(&self, name: &str) -> anyhow::Result<FolderId> {
        let folders = &self.dir().state().folders;
        let user = self.user();
        let visible =
            |f: &engine::directory::Folder| user.is_some_and(|u| self.dir().state().is_participant(f, &u));
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
        let f = self.dir().folder(folder).ok_or_else(|| anyhow!("no such folder"))?;
        let member = self.user().is_some_and(|u| self.dir().state().is_participant(f, &u));
        if !member {
            return Err(Refused::NotMember { folder: f.name.clone() }.into());
        }
        Ok(())
    }

    /// [`Node::check_member`], and the folder is mapped here (it has a replica).
    pub fn check_mapped(&self, folder: &FolderId) -> anyhow::Result<()> {
        self.check_member(folder)?;
        let f = self.dir().folder(folder).ok_or_else(|| anyhow!("no such folder"))?;
        if !f.mapped.contains(&self.id) {
            return Err(Refused::NotMapped { folder: f.name.clone() }.into());
        }
        Ok(())
    }

    /// Finds a user by directory name, account-free (unique names) or hex id (prefix).
    pub fn find_user(&self, name: &str) -> anyhow::Result<UserId> {
        let users = &self.dir().state().users;
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
        let all: Vec<DeviceId> = self.dir().state().device_user.keys().copied().collect();
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

    /// A local write: create/update/delete/resolve an item, signed, and durable on return (the
    /// item and its outbox entry in one commit: a crash between two commits stranded an outbox
    /// entry, or lost one).
    pub fn write(&mut self, folder: &FolderId, id: &str, edit: Edit) -> anyhow::Result<Arc<Item>> {
        self.check_mapped(folder)?;
        let id = ItemId::new(id).map_err(|e| anyhow!("item id: {e}"))?;
        let when = When::from_unix_secs(transport::now_secs()).map_err(|e| anyhow!("{e}"))?;
        if edit.resolve && self.replica(folder).and_then(|r| r.item(&id)).is_none() {
            bail!("no item {id} to resolve");
        }
        let item = self.device.write(*folder, &id, &when, &edit).map_err(|e| anyhow!("{e}"))?;
        self.outbox.entry(*folder).or_default().insert(id.as_str().to_string());
        let outbox = postcard::to_allocvec(&self.outbox)?;
        self.commit_with(Some(*folder), &[("outbox", &outbox)])?;
        Ok(item)
    }

    /// Merges items read from a feed file into `folder` (each checked against the folder's
    /// signers); per item, whether it merged. Stored on return.
    pub fn import(&mut self, folder: &FolderId, items: &[Arc<Item>]) -> anyhow::Result<Vec<bool>> {
        self.check_mapped(folder)?;
        let merged = self.device.import(*folder, items).map_err(|e| anyhow!("{e}"))?;
        self.commit()?;
        Ok(merged)
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
        if self.replica(folder).and_then(|r| r.item(&fid)).is_none_or(|i| i.version.deleted) {
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

    /// A session with the cloud on `folder` started as `sid`: remember the outbox as it is.
    pub fn cloud_session_started(&mut self, sid: u64, folder: FolderId) {
        let at_start = self.outbox_fingerprints(&folder);
        self.at_start.insert(sid, (folder, at_start));
    }

    /// A session with the cloud ended: if it finished, items whose fingerprint is what it was
    /// when the session started are now in the cloud's replica.
    pub fn cloud_session_ended(&mut self, sid: u64, done: bool) -> anyhow::Result<()> {
        let Some((folder, at_start)) = self.at_start.remove(&sid) else { return Ok(()) };
        if !done {
            return Ok(());
        }
        let Some(replica) = self.device.replica(&folder) else { return Ok(()) };
        let Some(out) = self.outbox.get_mut(&folder) else { return Ok(()) };
        out.retain(|id| {
            let now = ItemId::new(id).ok().and_then(|i| replica.fingerprint_of(&i));
            now.is_none() || now != at_start.get(id).copied()
        });
        if out.is_empty() {
            self.outbox.remove(&folder);
        }
        tracing::debug!(%folder, acked = at_start.len(), pending = self.pending(&folder), "cloud session done");
        self.save_outbox()
    }

    /// Fingerprints of the outbox items of `folder` now.
    pub fn outbox_fingerprints(&self, folder: &FolderId) -> BTreeMap<String, u64> {
        let (Some(replica), Some(out)) = (self.device.replica(folder), self.outbox.get(folder)) else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A write of this device's own comes after what sessions merged before it, in the store as
    /// in the replica: merged items wait for the session's end, so a write in between first
    /// stores them (else the older merged state would overwrite the newer write when stored).
    #[test]
    fn a_local_write_is_never_overwritten_by_an_earlier_merge() {
        let root = tempfile::tempdir().unwrap();
        let cfg = NodeConfig {
            cloud: DeviceId::of(&DeviceKey::from_bytes(&[9; 32])),
            relay_url: "http://127.0.0.1:1/".into(),
            cloud_addrs: Vec::new(),
            relay_ca_pem: None,
            relay_qad_port: None,
        };
        create(root.path(), &cfg).unwrap();
        let mut n = Node::open(root.path()).unwrap();
        n.make(Op::CreateUser { name: "u".into() }).unwrap();
        let folder = n.make(Op::CreateFolder { name: "f".into() }).unwrap().folder_id();
        n.make(Op::Map { folder }).unwrap();
        let old = n.put(&folder, "x", None, "old").unwrap();
        // As a session's merge leaves it: waiting for the session's end.
        n.merged.entry(folder).or_default().push(old);
        let new = n.put(&folder, "x", None, "new").unwrap();
        n.sync_store().unwrap();
        drop(n);
        let n = Node::open(root.path()).unwrap();
        let id = ItemId::new("x").unwrap();
        let stored = n.replica(&folder).and_then(|r| r.item(&id)).cloned().unwrap();
        assert_eq!(stored.version, new.version);
    }
}

/// How a `cloud` folder's content stands at the cloud, as the last upload round found it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CloudContent {
    /// Live files whose content the cloud holds whole, of those this device has.
    pub stored_files: usize,
    pub files: usize,
    /// The folder owner's usage and quota at the cloud, in bytes (as the cloud last said).
    pub used: u64,
    pub quota: u64,
    /// Past the quota: new content goes peer to peer only.
    pub over_quota: bool,
    /// Why uploads do not run, if they do not (no content key yet, cloud unreachable, ...).
    pub waiting: Option<String>,
}

//! A replica: one feed's items, a local change sequence and an order-independent digest.
//!
//! Every accepted change (a local operation, or a merge that changed an item) gets the next
//! sequence number of the replica's *epoch*, so a peer can ask "what changed since N of epoch E".
//! A replica that restarts without its full change log starts a new epoch (the caller picks it),
//! so no old cursor can skip a change. The log keeps only each item's latest change, so it is as
//! large as the item set. Items are `Arc`s: replicas of the same feed share every payload.
//!
//! A replica is *unsigned* (plain FeedSync) or *signed*: a signed replica makes local changes only
//! with a device key (signing the new version) and verifies every version it receives before
//! merging it, optionally also checking that the signer may write this feed (`set_signers`).

use std::collections::BTreeMap;
use std::sync::Arc;

use std::collections::BTreeSet;

use crate::feedsync::{self, Edit, Endpoint, FeedsyncError, Item, ItemId, When};
use crate::signing::{self, DeviceId, DeviceKey, FeedScope, SignatureError};

/// A 64-bit fingerprint of an item's whole state (id, winner, conflicts).
pub type Fingerprint = u64;

/// Sequence numbers of a replica's change log, within one epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Seq(pub u64);

/// Where a peer is in a replica's change log: everything up to `seq` of `epoch`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: Seq,
}

/// A version's hash: BLAKE3 (keyed with a fixed domain key) of its canonical encoding, 128 bits.
/// What an item's [`fingerprint`] is made of.
pub fn version_hash(version: &feedsync::Version) -> u128 {
    const KEY: [u8; 32] = *b"feedmesh version hash v1 #######";
    let mut bytes = Vec::with_capacity(128 + version.history.len() * 48 + version.content.inner.len());
    feedsync::encode_version_into(version, &mut bytes);
    let hash = blake3::keyed_hash(&KEY, &bytes);
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash.as_bytes()[..16]);
    u128::from_le_bytes(first)
}

/// Fingerprint of an item's whole state (id, winner, conflicts), 64 bits: for an item without
/// conflicts, its version's [`version_hash`] truncated; else BLAKE3 (keyed) of the version hashes,
/// winner first, truncated. Made of version hashes so that a replica holding a hot item (a
/// conflict per concurrent writer) hashes only the versions a change brings, not all of them.
pub fn fingerprint(item: &Item) -> Fingerprint {
    if item.conflicts.is_empty() {
        return version_hash(&item.version) as u64;
    }
    let hashes: Vec<u128> = versions(item).map(version_hash).collect();
    fingerprint_of(&hashes)
}

/// [`fingerprint`] of an item with conflicts, from its version hashes (winner first).
fn fingerprint_of(hashes: &[u128]) -> Fingerprint {
    const KEY: [u8; 32] = *b"feedmesh item fingerprint v2 ###";
    let mut hasher = blake3::Hasher::new_keyed(&KEY);
    for h in hashes {
        hasher.update(&h.to_le_bytes());
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

#[derive(Clone, Debug)]
struct Entry {
    item: Arc<Item>,
    fp: Fingerprint,
    seq: Seq,
    /// The latest change was a local operation (not a merge of a peer's version).
    local: bool,
    /// For an item with conflicts, what each version (winner first) keeps; `None` for an item
    /// without (its one version came with the latest change, `seq`) and after a restore.
    versions: Option<Arc<Versions>>,
}

/// Per version of an entry's item, winner first.
#[derive(Debug)]
struct Versions {
    /// Where the version entered this replica: the sequence of the change that brought it. A
    /// peer whose cursor of this log is at `c` holds every version that entered at or before `c`
    /// (see [`Replica::item_since`]).
    arrivals: Vec<Seq>,
    /// Its [`version_hash`], so that a change hashes only the versions it brings.
    hashes: Vec<u128>,
}

impl Entry {
    fn arrival(&self, k: usize) -> Seq {
        self.versions.as_ref().and_then(|v| v.arrivals.get(k).copied()).unwrap_or(self.seq)
    }

    fn hash(&self, k: usize) -> u128 {
        match self.versions.as_ref().and_then(|v| v.hashes.get(k).copied()) {
            Some(h) => h,
            None => versions(&self.item).nth(k).map(version_hash).unwrap_or_default(),
        }
    }
}

/// The versions of an item, winner first.
fn versions(item: &Item) -> impl Iterator<Item = &feedsync::Version> {
    std::iter::once(&item.version).chain(item.conflicts.iter())
}

/// The fingerprint and per-version state of `item`, the new state of the entry `old` (if any)
/// stored at `seq`: the versions `old` held keep their arrival and hash, the others arrive at
/// `seq` and are hashed. Bounded by the item: at most `CONFLICTS_PER_ITEM_MAX + 1` versions on
/// each side, compared in full only on an equal topmost sequence.
fn entry_state(old: Option<&Entry>, item: &Item, seq: Seq) -> (Fingerprint, Option<Arc<Versions>>) {
    if item.conflicts.is_empty() {
        return (fingerprint(item), None);
    }
    let same =
        |a: &feedsync::Version, b: &feedsync::Version| a.topmost().sequence == b.topmost().sequence && a == b;
    let mut kept = vec![false; old.map_or(0, |o| o.item.conflicts.len() + 1)];
    let mut arrivals = Vec::with_capacity(item.conflicts.len() + 1);
    let mut hashes = Vec::with_capacity(item.conflicts.len() + 1);
    for v in versions(item) {
        let held = old.and_then(|o| versions(&o.item).enumerate().find(|(k, h)| !kept[*k] && same(v, h)));
        match (old, held) {
            (Some(o), Some((k, _))) => {
                kept[k] = true;
                arrivals.push(o.arrival(k));
                hashes.push(o.hash(k));
            }
            _ => {
                arrivals.push(seq);
                hashes.push(version_hash(v));
            }
        }
    }
    (fingerprint_of(&hashes), Some(Arc::new(Versions { arrivals, hashes })))
}

/// One entry of the change log, as [`Replica::log_since`] gives it.
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    pub seq: Seq,
    pub item: &'a Arc<Item>,
    pub fp: Fingerprint,
    /// Made here by a local operation, so a peer can only have it from us (or via someone we
    /// sent it to); merged changes came from some peer and may be anywhere already.
    pub local: bool,
}

/// One feed's replica.
#[derive(Clone, Debug)]
pub struct Replica {
    epoch: u64,
    head: Seq,
    items: BTreeMap<ItemId, Entry>,
    /// The change log: the latest change of each item, by sequence.
    log: BTreeMap<Seq, ItemId>,
    /// Fingerprint to item, for answering a peer's "send me these".
    by_fp: BTreeMap<Fingerprint, ItemId>,
    /// The [`version_hash`]es (64 bits) of the versions of items with conflicts whose per-version
    /// state is known (not restored ones), counted: which versions a peer's `wire::Body::Hello::held`
    /// names this replica holds too (a version without conflicts is its item's fingerprint).
    by_version: BTreeMap<u64, u32>,
    digest: u64,
    signing: Signing,
    /// What this replica's signatures are bound to (see [`FeedScope`]).
    scope: Option<FeedScope>,
    /// Signatures a driver checked before handing in a message (see [`Replica::set_verified`]).
    verified: signing::Verified,
}

/// Whether a replica requires signed versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signing {
    /// Plain FeedSync: signatures are carried along, never required or checked.
    Off,
    /// Every received version must carry a valid signature for the replica's scope (its folder);
    /// with `signers`, by one of them.
    On { signers: Option<Arc<BTreeSet<DeviceId>>> },
}

impl Replica {
    /// An empty replica in `epoch` (the caller's choice: a fresh random value per incarnation).
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            head: Seq(0),
            items: BTreeMap::new(),
            log: BTreeMap::new(),
            by_fp: BTreeMap::new(),
            by_version: BTreeMap::new(),
            digest: 0,
            signing: Signing::Off,
            scope: None,
            verified: signing::Verified::default(),
        }
    }

    /// An empty signed replica of the feed `scope` in `epoch`: local changes are signed for
    /// `scope`, received versions verified against it (a version signed for another folder is
    /// refused).
    pub fn new_signed(epoch: u64, scope: FeedScope) -> Self {
        Self { signing: Signing::On { signers: None }, scope: Some(scope), ..Self::new(epoch) }
    }

    /// An unsigned replica that still signs its own changes ([`Replica::change_signed`]) for
    /// `scope` (a test or simulated adversary that keeps whatever it is sent).
    pub fn scoped(self, scope: FeedScope) -> Self {
        Self { scope: Some(scope), ..self }
    }

    /// The folder whose feed this replica holds, if it signs or verifies.
    pub fn scope(&self) -> Option<FeedScope> {
        self.scope
    }

    pub fn signing(&self) -> &Signing {
        &self.signing
    }

    /// Signed mode: the devices whose versions are accepted (`None`: any valid signature). The
    /// authorized session sets it from the verified directory before it merges anything.
    pub fn set_signers(&mut self, signers: Option<BTreeSet<DeviceId>>) {
        if let Signing::On { signers: slot } = &mut self.signing {
            *slot = signers.map(Arc::new);
        }
    }

    /// The devices whose versions a signed replica accepts (`None`: any, or not signed).
    pub fn signers(&self) -> Option<Arc<BTreeSet<DeviceId>>> {
        match &self.signing {
            Signing::On { signers } => signers.clone(),
            Signing::Off => None,
        }
    }

    /// Signatures checked ahead of the next merges, outside whatever lock guards this replica
    /// ([`signing::Verified::check`]); they replace the previous set. Only valid signatures are
    /// in it, so it changes no outcome, only where the work is done.
    pub fn set_verified(&mut self, verified: signing::Verified) {
        self.verified = verified;
    }

    /// Checks an incoming item against this replica's signing mode (nothing to check when
    /// unsigned). Versions this replica already holds with the same signature are not checked again.
    pub fn check_incoming(&self, item: &Item) -> Result<(), SignatureError> {
        match &self.signing {
            Signing::Off => Ok(()),
            Signing::On { signers } => {
                // `new_signed` is the only way into signed mode, and it sets the scope.
                let scope = self.scope.as_ref().ok_or(SignatureError::NoScope)?;
                let known = self.item(item.id()).map(|i| i.as_ref());
                signing::verify_item(item, known, scope, signers.as_deref(), &self.verified)
            }
        }
    }

    /// [`Replica::check_incoming`] for a batch, on up to `threads` threads (the caller's choice;
    /// the engine never asks the OS). The answer does not depend on `threads`: the error is
    /// that of the first failing item in order, as checking them one by one would give.
    pub fn check_incoming_all(&self, items: &[Arc<Item>], threads: usize) -> Result<(), SignatureError> {
        let Signing::On { signers } = &self.signing else { return Ok(()) };
        let scope = self.scope.as_ref().ok_or(SignatureError::NoScope)?;
        // Each version's leaf hash once. What is neither held already nor checked ahead by the
        // driver (`set_verified`) is checked here in one pass, which checks each batch root
        // once; then each item in order, so the error is the first failing item's, as one by one.
        let mut keys: Vec<Option<[u8; 32]>> = Vec::new();
        let mut pending: Vec<(&feedsync::Version, [u8; 32])> = Vec::new();
        for item in items {
            let known = self.item(item.id()).map(|k| k.as_ref());
            for v in std::iter::once(&item.version).chain(item.conflicts.iter()) {
                let key = match &v.signature {
                    Some(sig) if !signing::held(known, v) => {
                        let leaf = signing::leaf_hash(v, scope);
                        let key = signing::verified_key(&leaf, sig);
                        if !self.verified.holds_key(&key) {
                            pending.push((v, leaf));
                        }
                        Some(key)
                    }
                    _ => None,
                };
                keys.push(key);
            }
        }
        let fresh = signing::Verified::check_leaves(&pending, scope, signers.as_deref(), threads);
        let mut keys = keys.into_iter();
        for item in items {
            let known = self.item(item.id()).map(|k| k.as_ref());
            for v in std::iter::once(&item.version).chain(item.conflicts.iter()) {
                let key = keys.next().flatten();
                if signing::held(known, v) {
                    continue;
                }
                let device = match key {
                    Some(k) if self.verified.holds_key(&k) || fresh.holds_key(&k) => signing::signer_of(v)?,
                    _ => signing::verify_version(v, scope)?,
                };
                if signers.as_deref().is_some_and(|s| !s.contains(&device)) {
                    return Err(SignatureError::NotAllowed { id: v.id.clone(), device });
                }
            }
        }
        Ok(())
    }

    /// Verifies a batch (see [`Replica::check_incoming_all`]) and, only if every item passes,
    /// merges them in order. Returns how many changed the replica. A merge error (the feed is
    /// full) stops there, keeping the items merged before it, as merging one by one would.
    pub fn merge_all(&mut self, items: &[Arc<Item>], threads: usize) -> Result<usize, FeedsyncError> {
        self.check_incoming_all(items, threads)?;
        let mut changed = 0;
        for item in items {
            changed += usize::from(self.merge_checked(item)?);
        }
        Ok(changed)
    }

    /// Loads what this replica's own store held. Every stored item was checked (signature,
    /// signer, validity) before it was committed, and the store's integrity is the store's job
    /// (redb checksums its pages), so nothing is verified again: a restart with 10^6 items costs
    /// their decoding and indexing, not 10^6 ed25519 checks. Never for items from anywhere else.
    /// A merge error (the feed is full) stops there, keeping what was merged before it.
    /// Fingerprints are computed on up to `threads` threads (the caller's choice).
    pub fn restore(
        &mut self,
        items: impl IntoIterator<Item = Arc<Item>>,
        threads: usize,
    ) -> Result<usize, FeedsyncError> {
        let items: Vec<Arc<Item>> = items.into_iter().collect();
        // A store gives an empty replica its items by id, once each: the indexes are built in
        // bulk (sorted input, no rebalancing), not item by item.
        if self.items.is_empty()
            && items.len() <= feedsync::limits::ITEMS_PER_FEED_MAX
            && items.windows(2).all(|w| w[0].id() < w[1].id())
        {
            let start = self.head.0;
            let threads = threads.clamp(1, items.len().div_ceil(4096).max(1));
            let fps: Vec<Fingerprint> = if threads == 1 {
                items.iter().map(|i| fingerprint(i)).collect()
            } else {
                std::thread::scope(|scope| {
                    let handles: Vec<_> = items
                        .chunks(items.len().div_ceil(threads))
                        .map(|chunk| {
                            scope.spawn(move || chunk.iter().map(|i| fingerprint(i)).collect::<Vec<_>>())
                        })
                        .collect();
                    let parts = handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
                    parts.flatten().collect()
                })
            };
            let seq = |k: usize| Seq(start + k as u64 + 1);
            self.log = items.iter().enumerate().map(|(k, i)| (seq(k), i.id().clone())).collect();
            self.by_fp = fps.iter().zip(&items).map(|(fp, i)| (*fp, i.id().clone())).collect();
            self.digest = fps.iter().fold(self.digest, |d, fp| d.wrapping_add(*fp));
            let n = items.len();
            self.head = Seq(start + n as u64);
            self.items = items
                .into_iter()
                .zip(fps)
                .enumerate()
                .map(|(k, (item, fp))| {
                    (
                        item.id().clone(),
                        Entry {
                            item,
                            fp,
                            seq: seq(k),
                            local: false,
                            // Restored: every version counts as brought by this change, so a peer
                            // gets the whole item once (the store keeps no arrivals).
                            versions: None,
                        },
                    )
                })
                .collect();
            return Ok(n);
        }
        let mut changed = 0;
        for item in items {
            changed += usize::from(self.merge_checked(&item)?);
        }
        Ok(changed)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last sequence number given out.
    pub fn head(&self) -> Seq {
        self.head
    }

    pub fn cursor(&self) -> Cursor {
        Cursor { epoch: self.epoch, seq: self.head }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Order-independent digest: the wrapping sum of the items' fingerprints.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    pub fn item(&self, id: &ItemId) -> Option<&Arc<Item>> {
        self.items.get(id).map(|e| &e.item)
    }

    /// Items by id.
    pub fn items(&self) -> impl Iterator<Item = &Arc<Item>> {
        self.items.values().map(|e| &e.item)
    }

    /// The fingerprints of all items (ascending by id).
    pub fn fingerprints(&self) -> impl Iterator<Item = Fingerprint> + '_ {
        self.items.values().map(|e| e.fp)
    }

    /// `(fingerprint, id)` of every item, by id.
    pub fn fingerprinted(&self) -> impl Iterator<Item = (Fingerprint, &ItemId)> + '_ {
        self.items.iter().map(|(id, e)| (e.fp, id))
    }

    pub fn by_fingerprint(&self, fp: Fingerprint) -> Option<&Arc<Item>> {
        self.by_fp.get(&fp).and_then(|id| self.item(id))
    }

    /// The sequence number of the item's latest change here.
    pub fn seq_of(&self, id: &ItemId) -> Option<Seq> {
        self.items.get(id).map(|e| e.seq)
    }

    pub fn fingerprint_of(&self, id: &ItemId) -> Option<Fingerprint> {
        self.items.get(id).map(|e| e.fp)
    }

    /// Items changed after `since` (in this epoch), oldest first.
    pub fn changes_since(&self, since: Seq) -> impl Iterator<Item = (Seq, &Arc<Item>)> {
        self.log
            .range(Seq(since.0.saturating_add(1))..)
            .filter_map(|(seq, id)| self.item(id).map(|i| (*seq, i)))
    }

    /// The change log after `since` (in this epoch), oldest first, with fingerprints and origin.
    pub fn log_since(&self, since: Seq) -> impl Iterator<Item = Change<'_>> {
        self.log.range(Seq(since.0.saturating_add(1))..).filter_map(|(seq, id)| {
            self.items.get(id).map(|e| Change { seq: *seq, item: &e.item, fp: e.fp, local: e.local })
        })
    }

    /// The item `id` as a peer needs it whose cursor of this log (this epoch) is at `since`:
    /// only the versions that entered after `since`, less those that entered through a change in
    /// one of the `skip` ranges (`(from, to]`: merges of versions the peer sent in this session),
    /// as an item of their own. The versions keep the item's best-first order, so the first is the
    /// winner of the subset. `None` when the peer holds every version (or the item is gone).
    ///
    /// Sound because a cursor at `since` means the peer merged a state of this item from a
    /// moment when every version that had entered by `since` was in it (a version stays in the
    /// item from its arrival on, or it would have a later arrival), and merge keeps the maximal
    /// versions of the union: merging the subset gives the peer what merging the whole item
    /// would, for a version it holds changes nothing and one it dropped was dropped for a
    /// version of its own that subsumes it. (That last step takes subsumption to be transitive,
    /// as it is for histories the engine writes. A crafted history for which it is not can make
    /// two replicas differ in that item, as it could with whole items, where such a pair of
    /// states sends nothing either.) A subset led by a `noconflicts` winner with others, which
    /// is not a valid item, goes whole.
    ///
    /// `held` (sorted) names versions the peer said it holds, by [`version_hash`] truncated to 64
    /// bits (`wire::Body::Hello::held`): they are left out too, by the same argument (the peer's state
    /// holds each of them or a version of its own that subsumes it).
    pub fn item_since(
        &self,
        id: &ItemId,
        since: Seq,
        skip: &[(Seq, Seq)],
        held: &[u64],
    ) -> Option<Arc<Item>> {
        let entry = self.items.get(id)?;
        if entry.versions.is_none() {
            return (entry.seq > since).then(|| entry.item.clone());
        }
        let wanted = |k: usize| {
            let a = entry.arrival(k);
            a > since
                && !skip.iter().any(|&(from, to)| a > from && a <= to)
                && (held.is_empty() || held.binary_search(&(entry.hash(k) as u64)).is_err())
        };
        let picked: Vec<&feedsync::Version> =
            versions(&entry.item).enumerate().filter(|(k, _)| wanted(*k)).map(|(_, v)| v).collect();
        match picked.split_first() {
            None => None,
            Some(_) if picked.len() == entry.item.conflicts.len() + 1 => Some(entry.item.clone()),
            Some((winner, _)) if winner.noconflicts && picked.len() > 1 => Some(entry.item.clone()),
            Some((winner, rest)) => Some(Arc::new(Item {
                version: (*winner).clone(),
                conflicts: rest.iter().map(|v| (*v).clone()).collect(),
            })),
        }
    }

    /// The [`version_hash`]es of `item`'s versions (winner first) if this replica holds exactly
    /// that state of it and keeps them (an item with conflicts, not restored), for a caller that
    /// would hash them again (the simulator's checker).
    pub fn version_hashes_of(&self, item: &Arc<Item>) -> Option<&[u128]> {
        let entry = self.items.get(item.id())?;
        if !Arc::ptr_eq(&entry.item, item) {
            return None;
        }
        entry.versions.as_ref().map(|v| v.hashes.as_slice())
    }

    /// Whether this replica holds a version whose [`version_hash`] truncated to 64 bits is `h`, as
    /// far as it knows cheaply: versions of items with conflicts (not restored ones) and items of
    /// one version. A `false` only costs a peer bytes (it sends the version).
    pub fn holds_version(&self, h: u64) -> bool {
        self.by_version.contains_key(&h)
            || self
                .by_fp
                .get(&h)
                .and_then(|id| self.items.get(id))
                .is_some_and(|e| e.item.conflicts.is_empty())
    }

    /// The [`version_hash`]es (64 bits) of the versions of this replica's items with conflicts
    /// (not restored ones), ascending, each once.
    pub fn held_versions(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_version.keys().copied()
    }

    /// For an item with conflicts, the [`version_hash`]es (truncated to 64 bits) of its versions
    /// that entered this replica after `since` (what `wire::Body::Hello::held` names); none for an item
    /// without conflicts, whose fingerprint is its one version's hash already.
    pub fn held_since(&self, id: &ItemId, since: Seq) -> impl Iterator<Item = u64> + '_ {
        let entry = self.items.get(id).filter(|e| e.versions.is_some());
        let n = entry.map_or(0, |e| e.item.conflicts.len() + 1);
        (0..n).filter_map(move |k| {
            let e = entry?;
            (e.arrival(k) > since).then(|| e.hash(k) as u64)
        })
    }

    /// Where each version of an item entered this replica (see [`Replica::item_since`]), for a
    /// model checker's state hash.
    pub fn arrivals(&self, id: &ItemId) -> Option<Vec<Seq>> {
        self.items.get(id).map(|e| (0..=e.item.conflicts.len()).map(|k| e.arrival(k)).collect())
    }

    /// Records a new state for an item: next sequence number, log, digest, index.
    fn store(&mut self, item: Arc<Item>, local: bool) -> Seq {
        let id = item.id().clone();
        self.head = Seq(self.head.0 + 1);
        let seq = self.head;
        let (fp, versions) = entry_state(self.items.get(&id), &item, seq);
        if let Some(v) = &versions {
            for h in &v.hashes {
                *self.by_version.entry(*h as u64).or_default() += 1;
            }
        }
        let entry = Entry { item, fp, seq, local, versions };
        if let Some(old) = self.items.insert(id.clone(), entry) {
            for h in old.versions.iter().flat_map(|v| v.hashes.iter()) {
                if let std::collections::btree_map::Entry::Occupied(mut e) = self.by_version.entry(*h as u64)
                {
                    *e.get_mut() -= 1;
                    if *e.get() == 0 {
                        e.remove();
                    }
                }
            }
            self.log.remove(&old.seq);
            self.by_fp.remove(&old.fp);
            self.digest = self.digest.wrapping_sub(old.fp);
        }
        self.log.insert(seq, id.clone());
        self.by_fp.insert(fp, id);
        self.digest = self.digest.wrapping_add(fp);
        seq
    }

    /// A local change (create, update, delete, resolve) by endpoint `by` at `when`.
    pub fn change(
        &mut self,
        id: &ItemId,
        by: &Endpoint,
        when: &When,
        edit: &Edit,
    ) -> Result<Seq, FeedsyncError> {
        if self.signing != Signing::Off {
            return Err(SignatureError::LocalUnsigned.into());
        }
        self.change_inner(id, by, when, edit, None)
    }

    /// A local change signed by `key` for the replica's scope (the endpoint is the key's device
    /// id, see [`DeviceId::endpoint`]). Works in both modes; an unsigned replica needs a scope
    /// ([`Replica::scoped`]) and keeps the signature too.
    pub fn change_signed(
        &mut self,
        id: &ItemId,
        key: &DeviceKey,
        when: &When,
        edit: &Edit,
    ) -> Result<Seq, FeedsyncError> {
        let by = DeviceId::of(key).endpoint();
        self.change_inner(id, &by, when, edit, Some(key))
    }

    /// Local changes by `key`, all at `when`, signed together: one ed25519 signature per
    /// [`signing::BATCH_MAX`] versions ([`signing::sign_versions`]), so a bulk write costs its
    /// writer, and every device that receives it, a thirty-second of the signatures. Each version
    /// still carries all it needs to be verified and forwarded alone. The same as `changes.len()`
    /// calls of [`Replica::change_signed`] otherwise: in order, an id that comes again sees its
    /// earlier change, and an error keeps the changes before it (and reports how many in `Err`).
    pub fn change_signed_many(
        &mut self,
        key: &DeviceKey,
        when: &When,
        changes: &[(ItemId, Edit)],
    ) -> Result<usize, (usize, FeedsyncError)> {
        static NO_SCOPE: std::sync::LazyLock<Arc<feedsync::NsScope>> =
            std::sync::LazyLock::new(Default::default);
        let scope = self.scope.ok_or((0, SignatureError::NoScope.into()))?;
        let by = DeviceId::of(key).endpoint();
        let mut done = 0;
        // New states not stored yet, and their ids (a repeated id stores the batch first).
        let mut batch: Vec<Item> = Vec::new();
        let mut ids: BTreeSet<ItemId> = BTreeSet::new();
        let mut fresh = 0;
        let mut result = Ok(());
        for (id, edit) in changes {
            if ids.contains(id) || batch.len() == signing::BATCH_MAX {
                done += self.store_signed(&mut batch, &scope, key);
                ids.clear();
                fresh = 0;
            }
            let held = self.item(id).is_some();
            let next = match Item::change(self.item(id).map(|i| i.as_ref()), id, &by, when, edit, &NO_SCOPE) {
                Ok(next) => next,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if !held && self.items.len() + fresh >= feedsync::limits::ITEMS_PER_FEED_MAX {
                result = Err(FeedsyncError::TooManyItems);
                break;
            }
            fresh += usize::from(!held);
            ids.insert(id.clone());
            batch.push(next);
        }
        done += self.store_signed(&mut batch, &scope, key);
        result.map(|()| done).map_err(|e| (done, e))
    }

    /// Signs the winners of `batch` together and stores them (local changes); empties `batch`.
    fn store_signed(&mut self, batch: &mut Vec<Item>, scope: &FeedScope, key: &DeviceKey) -> usize {
        let versions: Vec<&feedsync::Version> = batch.iter().map(|i| &i.version).collect();
        let signatures = signing::sign_versions(&versions, scope, key);
        let n = batch.len();
        for (mut item, signature) in batch.drain(..).zip(signatures) {
            item.version.signature = Some(signature);
            self.store(Arc::new(item), true);
        }
        n
    }

    fn change_inner(
        &mut self,
        id: &ItemId,
        by: &Endpoint,
        when: &When,
        edit: &Edit,
        key: Option<&DeviceKey>,
    ) -> Result<Seq, FeedsyncError> {
        // A replica has no document around its items: new empty content has no bindings.
        static NO_SCOPE: std::sync::LazyLock<Arc<feedsync::NsScope>> =
            std::sync::LazyLock::new(Default::default);
        let mut next = Item::change(self.item(id).map(|i| i.as_ref()), id, by, when, edit, &NO_SCOPE)?;
        if self.item(id).is_none() && self.items.len() >= feedsync::limits::ITEMS_PER_FEED_MAX {
            return Err(FeedsyncError::TooManyItems);
        }
        if let Some(key) = key {
            let scope = self.scope.as_ref().ok_or(SignatureError::NoScope)?;
            // Only the new winner is new; the conflicts keep the signatures they came with.
            next.version.signature = Some(signing::sign_version(&next.version, scope, key));
        }
        Ok(self.store(Arc::new(next), true))
    }

    /// Merges an incoming item (FeedSync 3.3). Returns whether the replica changed. A signed
    /// replica first verifies the item (see [`Replica::check_incoming`]) and refuses it whole.
    pub fn merge(&mut self, incoming: &Arc<Item>) -> Result<bool, FeedsyncError> {
        self.check_incoming(incoming)?;
        self.merge_checked(incoming)
    }

    /// [`Replica::merge`] for an item already passed through [`Replica::check_incoming`].
    pub(crate) fn merge_checked(&mut self, incoming: &Arc<Item>) -> Result<bool, FeedsyncError> {
        match self.item(incoming.id()) {
            None => {
                if self.items.len() >= feedsync::limits::ITEMS_PER_FEED_MAX {
                    return Err(FeedsyncError::TooManyItems);
                }
                self.store(incoming.clone(), false);
                Ok(true)
            }
            Some(local) => {
                if Arc::ptr_eq(local, incoming) {
                    return Ok(false);
                }
                // Both hold the item invariants: this replica's items by construction, incoming
                // ones checked when decoded or restored.
                match feedsync::merge::merged_valid(local, incoming) {
                    None => Ok(false),
                    Some(merged) => {
                        // Share the incoming Arc when the result is exactly it.
                        let merged = if merged == **incoming { incoming.clone() } else { Arc::new(merged) };
                        self.store(merged, false);
                        Ok(true)
                    }
                }
            }
        }
    }

    /// The constant-time part of [`Replica::check_invariants`], cheap enough to run after every
    /// event of a simulation: the log and the fingerprint index match the item count, and the
    /// newest log entry is at or below the head.
    pub fn check_structure(&self) -> Result<(), String> {
        if self.log.len() != self.items.len() || self.by_fp.len() > self.items.len() {
            return Err(format!(
                "log {} / index {} / items {}",
                self.log.len(),
                self.by_fp.len(),
                self.items.len()
            ));
        }
        match self.log.last_key_value() {
            Some((seq, _)) if *seq > self.head => {
                Err(format!("log entry {} past the head {}", seq.0, self.head.0))
            }
            _ => Ok(()),
        }
    }

    /// Checks the replica's invariants: index, log and digest agree with the items.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_structure()?;
        let mut digest = 0u64;
        for (id, entry) in &self.items {
            if entry.item.id() != id {
                return Err(format!("item {id} stored under another id"));
            }
            if fingerprint(&entry.item) != entry.fp {
                return Err(format!("item {id}: stale fingerprint"));
            }
            if self.log.get(&entry.seq) != Some(id) {
                return Err(format!("item {id}: not in the log at its sequence"));
            }
            if entry.seq > self.head {
                return Err(format!("item {id}: sequence past the head"));
            }
            entry.item.check_invariants().map_err(|e| e.to_string())?;
            digest = digest.wrapping_add(entry.fp);
        }
        if digest != self.digest {
            return Err("digest differs from the items".into());
        }
        Ok(())
    }
}

//! Targets for the engine's decoders: wire messages, items, directory changes, tickets and the
//! FeedSync XML reader. Each decodes what a peer (or the cloud) could send, checks that whatever
//! is accepted holds its invariants and round-trips, and for the state-bearing ones (replicas,
//! the directory) that a refusal changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use engine::directory::{
    consent_message, short_code, ChangeBody, Directory, FolderId, Op, SignedChange, PAIRING_DOMAIN,
};
use engine::feedsync::{self, merge_item, xml, Item};
use engine::replica::{fingerprint, Replica};
use engine::signing::{self, DeviceId, Sig64};
use engine::ticket::{
    ChannelKey, Ticket, TicketBody, TicketError, TICKET_DOMAIN, TICKET_FOLDERS_MAX, TICKET_LIFETIME_MAX_US,
    TICKET_SKEW_US,
};
use engine::wire::{self, Body, WireItem};
use serde::{Deserialize, Serialize};

use crate::fixture::{self, world, T0};

/// The largest message the targets accept (the engine's default `max_message_bytes`).
const MESSAGE_MAX: usize = 1 << 20;

/// `wire::decode` of one message; everything it carries is checked as its receiver would.
pub fn wire_message(data: &[u8]) {
    let peeked = wire::peek(data);
    let Ok(message) = wire::decode(data, MESSAGE_MAX) else { return };
    // The router's view of a message agrees with the decoder's.
    assert_eq!(peeked, Some((message.session, message.step, message.body.kind())), "peek disagrees");
    let bytes = wire::encode(&message);
    assert_eq!(wire::decode(&bytes, usize::MAX).as_ref(), Ok(&message), "a decoded message round-trips");
    assert_eq!(wire::encoded_len(&message), bytes.len());
    let w = world();
    let items: &[WireItem] = match &message.body {
        Body::Hello { push: Some(push), .. } => &push.items,
        Body::Changes { items, .. } | Body::Diff { items, .. } | Body::Items { items, .. } => items,
        _ => &[],
    };
    for item in items {
        check_item(item);
    }
    let tickets: Vec<&Ticket> = match &message.body {
        Body::DirHello { ticket, .. } | Body::DirSync { ticket, .. } => vec![ticket],
        _ => Vec::new(),
    };
    for ticket in tickets {
        if let Ok(body) = ticket.verify(&w.cloud(), T0, &ticket.body.channel) {
            assert_eq!(body, &ticket.body);
        }
    }
    let changes: &[SignedChange] = match &message.body {
        Body::DirSync { changes, .. } | Body::DirDone { changes, .. } => changes,
        _ => &[],
    };
    if !changes.is_empty() {
        check_apply(&w.dir, changes);
    }
    if let Body::DirHello { folder, .. } = &message.body {
        assert_eq!(engine::authz::AuthSession::folder_of(data, MESSAGE_MAX), Some(*folder));
    }
}

/// `from_wire` of one item and, when it is valid, what a replica does with it.
fn check_item(w: &WireItem) -> Option<Item> {
    let item = wire::from_wire(w).ok()?;
    item.check_invariants().expect("an item from_wire accepts holds the item invariants");
    let again = wire::from_wire(&wire::to_wire(&item)).expect("what to_wire writes from_wire accepts");
    assert_eq!(again, item, "items round-trip through the wire form");
    assert_eq!(fingerprint(&again), fingerprint(&item));
    Some(item)
}

/// Merges `item` into a replica, checking invariants, idempotence and that a refusal (or a
/// merge that changes nothing) leaves the replica as it was.
fn merge_into(replica: &mut Replica, item: &Item) {
    let before = (replica.digest(), replica.len(), replica.head());
    let incoming = Arc::new(item.clone());
    match replica.merge(&incoming) {
        Ok(true) => {
            replica.check_invariants().expect("replica invariants after a merge");
            assert_eq!(replica.merge(&incoming), Ok(false), "merging the same item twice changes nothing");
        }
        Ok(false) | Err(_) => {
            assert_eq!(
                (replica.digest(), replica.len(), replica.head()),
                before,
                "a no-op merge changed the replica"
            );
        }
    }
    replica.check_invariants().expect("replica invariants after a merge");
}

/// Two wire items (postcard, one after the other): each is validated and merged into an empty
/// replica and into the fixture replicas (unsigned and signed); two valid items of one id must
/// merge commutatively and idempotently (FeedSync 3.3 as the proofs state it).
pub fn wire_item(data: &[u8]) {
    let Ok((first, rest)) = postcard::take_from_bytes::<WireItem>(data) else { return };
    let second = postcard::take_from_bytes::<WireItem>(rest).ok().map(|(w, _)| w);
    let items: Vec<Item> = std::iter::once(&first).chain(second.as_ref()).filter_map(check_item).collect();
    let pairs = fixture::pairs();
    for item in &items {
        merge_into(&mut Replica::new(7), item);
        merge_into(&mut pairs.plain.b.clone(), item);
        let mut signed = pairs.signed.b.clone();
        let checked = signed.check_incoming(item);
        merge_into(&mut signed, item);
        if checked.is_ok() {
            let scope = world().folder.scope();
            for version in std::iter::once(&item.version).chain(&item.conflicts) {
                // Versions the replica already had are skipped by check_incoming; the rest verify.
                let known = pairs.signed.b.item(item.id()).is_some_and(|k| {
                    std::iter::once(&k.version)
                        .chain(&k.conflicts)
                        .any(|v| v == version && v.signature == version.signature)
                });
                assert!(
                    known || signing::verify_version(version, &scope).is_ok(),
                    "check_incoming passed a bad signature"
                );
            }
        }
    }
    if let [a, b] = items.as_slice() {
        if a.id() == b.id() {
            let (ab, _) = merge_item(a, b);
            let (ba, _) = merge_item(b, a);
            ab.check_invariants().expect("a merge result holds the item invariants");
            assert_eq!(ab, ba, "merge is commutative");
            assert_eq!(merge_item(&ab, a).0, ab, "merging a merged-in item again changes nothing");
            assert_eq!(merge_item(&ab, b).0, ab, "merging a merged-in item again changes nothing");
        }
    }
}

/// A directory change the fuzzer describes and the fixture signs, so that changes get past the
/// signature check and reach the entitlement and ordering rules. `None` fields are filled in as
/// an honest author would: `seq` the next of its chain, `deps` the heads it has seen (the
/// directory's and this batch's earlier changes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Draft {
    /// Index into the world's keys (modulo their number).
    pub author: u8,
    pub seq: Option<u32>,
    /// Dependencies as (key index, seq).
    pub deps: Option<Vec<(u8, u32)>>,
    pub when: i64,
    pub op: Op,
}

impl Draft {
    /// Signs the draft; `heads` is what the author has seen (updated with this change).
    fn sign(&self, heads: &mut BTreeMap<DeviceId, u32>) -> SignedChange {
        let w = world();
        let k = &w.keys[usize::from(self.author) % w.keys.len()];
        let author = DeviceId::of(k);
        let seq = self.seq.unwrap_or_else(|| heads.get(&author).copied().unwrap_or(0).saturating_add(1));
        let deps = match &self.deps {
            Some(deps) => deps
                .iter()
                .map(|(i, s)| (DeviceId::of(&w.keys[usize::from(*i) % w.keys.len()]), *s))
                .collect(),
            None => {
                let mut deps: BTreeMap<DeviceId, u32> = heads.clone();
                deps.remove(&author);
                if seq > 1 {
                    deps.insert(author, seq - 1);
                }
                deps.into_iter().collect()
            }
        };
        let mut op = self.op.clone();
        // A pairing the fuzzer leaves unsigned (all-zero consent) is consented by the new device
        // when the fixture holds its key.
        if let Op::AddDevice { user, pairing } = &mut op {
            if pairing.consent == Sig64([0; 64]) {
                if let Some(new_key) = w.keys.iter().find(|k| DeviceId::of(k) == pairing.device) {
                    let code =
                        short_code(&author, &pairing.device, &pairing.nonce_existing, &pairing.nonce_new);
                    let message = consent_message(user, &author, pairing, code);
                    pairing.consent = signing::sign(new_key, PAIRING_DOMAIN, &message);
                }
            }
        }
        let entry = heads.entry(author).or_insert(0);
        *entry = (*entry).max(seq);
        SignedChange::sign(ChangeBody { author, seq, deps, when: self.when, op }, k)
    }
}

/// Directory changes: first byte even, a postcard `Vec<SignedChange>` as a peer sends it; odd,
/// a `Vec<Draft>` the fixture signs. Applied to the fixture directory: all or nothing,
/// idempotent, independent of order, and the state is a function of the set of changes.
pub fn directory(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let w = world();
    let changes: Vec<SignedChange> = if mode & 1 == 0 {
        match postcard::from_bytes(rest) {
            Ok(changes) => changes,
            Err(_) => return,
        }
    } else {
        let Ok(drafts) = postcard::from_bytes::<Vec<Draft>>(rest) else { return };
        let mut heads: BTreeMap<DeviceId, u32> = w.dir.heads();
        drafts.iter().take(engine::directory::CHANGES_PER_BATCH_MAX).map(|d| d.sign(&mut heads)).collect()
    };
    check_apply(&w.dir, &changes);
}

/// Applies `changes` to a clone of `base` and checks the directory's laws.
fn check_apply(base: &Directory, changes: &[SignedChange]) {
    let w = world();
    let mut dir = base.clone();
    let before = (dir.digest(), dir.len(), dir.heads());
    match dir.apply(changes) {
        Err(_) => {
            assert_eq!(
                (dir.digest(), dir.len(), dir.heads()),
                before,
                "a refused batch changed the directory"
            );
        }
        Ok(added) => {
            assert_eq!(dir.len(), before.1 + added, "apply counts what it added");
            let digest = dir.digest();
            assert_eq!(dir.apply(changes), Ok(0), "applying a batch twice adds nothing");
            assert_eq!(dir.digest(), digest);
            if added > 0 {
                let mut reversed: Vec<SignedChange> = changes.to_vec();
                reversed.reverse();
                let mut other = base.clone();
                assert_eq!(other.apply(&reversed), Ok(added), "a batch applies in any order");
                assert_eq!(other.digest(), digest, "the log order does not depend on delivery order");
                assert_eq!(other.state(), dir.state(), "the state does not depend on delivery order");
                let all: Vec<SignedChange> = dir.changes().cloned().collect();
                let mut rebuilt = Directory::new();
                assert_eq!(rebuilt.apply(&all), Ok(all.len()), "a directory's own log rebuilds it");
                assert_eq!(rebuilt.digest(), digest, "the directory is a function of its set of changes");
                assert_eq!(rebuilt.state(), dir.state(), "the directory is a function of its set of changes");
                for (author, seq) in dir.heads() {
                    assert!(seq >= 1, "a head names a change");
                    assert_eq!(dir.changes().filter(|c| c.body.author == author).count(), seq as usize);
                }
            }
            // Queries a session or the cloud makes of a changed directory.
            let folders: Vec<FolderId> = dir.state().folders.keys().copied().chain([w.folder]).collect();
            for folder in folders.iter().take(8) {
                for k in &w.keys {
                    let d = DeviceId::of(k);
                    let _ = dir.may_hold(folder, &d);
                    let _ = dir.may_sync(folder, &w.device("a1"), &d);
                    let _ = dir.folders_of(&d);
                }
                let _ = dir.signers(folder);
            }
            dir.news().check_invariants().expect("the news feed holds the feed invariants");
            assert_eq!(dir.missing_for(&BTreeMap::new()).len(), dir.len());
        }
    }
}

/// What the ticket target verifies a ticket against: the clock, the channel the transport
/// authenticated, and the folder asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TicketCheck {
    pub now_us: u64,
    pub peer: [u8; 32],
    pub folder: [u8; 16],
}

/// Tickets: first byte even, a postcard `(Ticket, TicketCheck)` as a peer presents it; odd, a
/// `(TicketBody, TicketCheck)` the fixture cloud signs, whose verification must match a model of
/// the rules (bounds, lifetime, window with skew, channel, folder, relay).
pub fn ticket(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let w = world();
    let cloud = w.cloud();
    let (ticket, check) = if mode & 1 == 0 {
        match postcard::from_bytes::<(Ticket, TicketCheck)>(rest) {
            Ok(v) => v,
            Err(_) => return,
        }
    } else {
        let Ok((body, check)) = postcard::from_bytes::<(TicketBody, TicketCheck)>(rest) else { return };
        let bytes = postcard::to_allocvec(&body).expect("plain data serialises");
        let signature = signing::sign(w.key("cloud"), TICKET_DOMAIN, &bytes);
        (Ticket { body, signature }, check)
    };
    let peer = ChannelKey(check.peer);
    let folder = FolderId(check.folder);
    let result = ticket.verify(&cloud, check.now_us, &peer).cloned();
    if mode & 1 == 1 {
        assert_eq!(
            result,
            model(&ticket.body, check.now_us, &peer),
            "ticket verification differs from the model"
        );
    }
    if let Ok(body) = &result {
        assert_eq!(body, &ticket.body);
        assert!(body.rights.folders.windows(2).all(|p| p[0] < p[1]));
        assert!(body.expires_us - body.issued_us <= TICKET_LIFETIME_MAX_US);
    }
    match ticket.verify_for_folder(&cloud, check.now_us, &peer, &folder) {
        Ok(body) => assert!(body.rights.folders.contains(&folder)),
        Err(TicketError::FolderNotGranted(f)) => {
            assert_eq!(f, folder);
            assert!(result.is_ok());
        }
        Err(e) => assert_eq!(Err(e), result),
    }
    match ticket.verify_for_relay(&cloud, check.now_us, &peer) {
        Ok(body) => assert!(body.rights.relay),
        Err(TicketError::RelayNotGranted) => assert!(result.is_ok()),
        Err(e) => assert_eq!(Err(e), result),
    }
    // The signature covers the body: a ticket verified for the cloud does not verify for anyone
    // else.
    if result.is_ok() {
        assert!(ticket.verify(&w.device("a1"), check.now_us, &peer).is_err());
    }
}

/// The ticket rules, in the order `Ticket::verify` states them (the signature is valid here).
fn model(b: &TicketBody, now_us: u64, peer: &ChannelKey) -> Result<TicketBody, TicketError> {
    let folders = &b.rights.folders;
    if folders.len() > TICKET_FOLDERS_MAX || folders.windows(2).any(|w| w[0] >= w[1]) {
        return Err(TicketError::Malformed);
    }
    if b.expires_us < b.issued_us || b.expires_us - b.issued_us > TICKET_LIFETIME_MAX_US {
        return Err(TicketError::Lifetime);
    }
    if now_us.saturating_add(TICKET_SKEW_US) < b.issued_us {
        return Err(TicketError::NotYetValid { issued_us: b.issued_us, now_us });
    }
    if now_us >= b.expires_us.saturating_add(TICKET_SKEW_US) {
        return Err(TicketError::Expired { expires_us: b.expires_us, now_us });
    }
    if b.channel != *peer {
        return Err(TicketError::WrongChannel);
    }
    Ok(b.clone())
}

/// The FeedSync XML reader: no input panics; what is accepted holds the invariants and
/// round-trips byte-stably through the writer.
pub fn read_feed(data: &[u8]) {
    if let Ok(feed) = xml::read_feed(data) {
        feed.check_invariants().expect("accepted feeds hold the invariants");
        let written = xml::write_feed(&feed);
        let again = xml::read_feed(written.as_bytes()).expect("what we write we can read");
        assert_eq!(xml::write_feed(&again), written, "writing is stable");
        let _: &feedsync::Feed = &again;
    }
}

/// A Live Folders file entry as a peer's item content, and its path: no input panics; an
/// accepted entry's path holds every rule (checked again from its text), round-trips through
/// the writer, and names an item id of the fixed shape; a conflict copy of it is a path too.
pub fn folder_entry(data: &[u8]) {
    use engine::folder::{FileEntry, FilePath, Platform};
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(path) = FilePath::new(text) {
        assert_eq!(FilePath::new(path.as_str()).as_ref(), Ok(&path));
        assert!(path.components().all(|c| !c.is_empty() && c != "." && c != ".."));
        let _ = path.check_local(Platform::Windows);
    }
    let content = feedsync::Content { attrs: "".into(), inner: text.into(), scope: Default::default() };
    let Ok(entry) = FileEntry::from_content(&content) else { return };
    assert_eq!(
        FilePath::new(entry.path.as_str()).as_ref(),
        Ok(&entry.path),
        "an accepted path holds the rules"
    );
    assert_eq!(FileEntry::from_content(&entry.to_content()).as_ref(), Ok(&entry), "entries round-trip");
    assert_eq!(entry.path.item_id().as_str().len(), 37);
    let by = feedsync::Endpoint::new("0123456789abcdef").expect("a valid endpoint");
    let when = feedsync::When::from_unix_secs(1_800_000_000).expect("a valid time");
    let item = Item::create(entry.path.item_id(), &by, &when, entry.to_content(), false);
    assert_eq!(FileEntry::from_version(&item.version).as_ref(), Ok(&entry));
    if let Ok(copy) = engine::folder::conflict_copy(&entry.path, &item.version) {
        assert_eq!(copy.parent(), entry.path.parent(), "a conflict copy sits beside its file");
    }
}

/// A peer's response for some chunk groups of a known file (3.5 groups), checked against the
/// file's root: the first byte picks the groups, the rest is the response. Whatever the bytes,
/// every group the decoder yields is the file's own (an oracle: the file is known here).
pub fn blob_response(data: &[u8]) {
    use engine::folder::blob::{groups_of, Decoder, Groups, Outboard};
    use engine::folder::fetch::GROUP_BYTES;
    let Some((&pick, response)) = data.split_first() else { return };
    let file: Vec<u8> = (0..(3 * GROUP_BYTES + GROUP_BYTES / 2) as usize).map(|i| (i % 251) as u8).collect();
    static OUTBOARD: std::sync::OnceLock<Outboard> = std::sync::OnceLock::new();
    let outboard = OUTBOARD.get_or_init(|| Outboard::of(&file));
    let total = groups_of(file.len() as u64);
    let start = u64::from(pick % 4).min(total - 1);
    let end = (start + 1 + u64::from(pick / 4 % 4)).min(total);
    let groups = Groups::new(start..end, outboard.size).expect("groups inside the file");
    for (next, item) in (start..).zip(Decoder::new(outboard.root, &groups, response)) {
        let Ok((group, bytes)) = item else { return };
        assert_eq!(group, next, "groups come in order");
        let at = (group * GROUP_BYTES) as usize;
        let want = &file[at..(at + GROUP_BYTES as usize).min(file.len())];
        assert_eq!(&bytes[..], want, "a verified group is the file's own");
    }
}

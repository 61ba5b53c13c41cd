//! Writes the seed corpora: runs real engine sessions between the fixture replicas (plain and
//! authorized, unsigned and signed, full and incremental, members and refused devices) and
//! records every message's bytes as seeds of the targets that read them, plus representative
//! directory batches, tickets, control messages, frames, feeds and HTTP requests.
//!
//! Run once from the workspace root, then minimise with libFuzzer (fuzz/README.md):
//!
//! ```text
//! cargo run -p feedmesh-fuzzing --example seeds -- fuzzing/corpus
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use engine::directory::{FolderId, Op, Pairing, Role, SignedChange, UserId};
use engine::feedsync::{write_feed, Dialect};
use engine::replica::Replica;
use engine::signing::{hex, Sig64};
use engine::sync::Retained;
use engine::ticket::{ChannelKey, Rights, TicketBody};
use engine::wire::{self, Body, WireItem};
use fuzzing::engine_targets::{Draft, TicketCheck};
use fuzzing::fixture::{self, pairs, world, Transcript, T0};
use fuzzing::{push_message, push_timeout};
use transport::{Notice, Open, PairView, Request, Response};

struct Out {
    root: PathBuf,
    written: BTreeSet<PathBuf>,
}

impl Out {
    fn put(&mut self, target: &str, label: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        let path = dir.join(format!("seed-{label}"));
        assert!(self.written.insert(path.clone()), "two seeds named {}", path.display());
        std::fs::write(&path, bytes).expect("seed written");
    }
}

/// A session target input: the header and every message of `transcript` going one way,
/// optionally with a timer step and a duplicate after each message.
fn steps(header: u8, transcript: &Transcript, to_responder: bool, noisy: bool) -> Vec<u8> {
    let mut out = vec![header];
    for (dir, bytes) in transcript {
        if *dir == to_responder {
            push_message(&mut out, bytes);
            if noisy {
                push_timeout(&mut out, 5);
                push_message(&mut out, bytes);
            }
        }
    }
    out
}

fn main() {
    let root = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("fuzzing/corpus"));
    let mut out = Out { root, written: BTreeSet::new() };
    folder_seeds(&mut out);
    let w = world();
    let mut messages: Vec<Vec<u8>> = Vec::new();

    // Plain sessions: unsigned and signed, first (full reconciliation) and later (incremental).
    for signed in [false, true] {
        let p = pairs().get(signed);
        for later in [false, true] {
            let (mut a, mut b, retained) = if later {
                (p.later_a.clone(), p.later_b.clone(), p.retained)
            } else {
                (p.a.clone(), p.b.clone(), Retained::default())
            };
            let (_, t) = fixture::run_plain(&mut a, &mut b, retained);
            let header = u8::from(signed) | (u8::from(later) << 1);
            let label = format!(
                "{}-{}",
                if signed { "signed" } else { "plain" },
                if later { "later" } else { "first" }
            );
            out.put("session_responder", &label, &steps(header, &t, true, false));
            out.put("session_responder", &format!("{label}-noisy"), &steps(header, &t, true, true));
            out.put("session_initiator", &label, &steps(header, &t, false, false));
            out.put("session_initiator", &format!("{label}-noisy"), &steps(header, &t, false, true));
            messages.extend(t.into_iter().map(|(_, m)| m));
        }
        // Against an empty replica on the other side.
        let (mut a, mut b) = (p.a.clone(), empty(signed, 2));
        let (_, t) = fixture::run_plain(&mut a, &mut b, Retained::default());
        let header = u8::from(signed) | 0x10;
        let label = if signed { "signed-empty" } else { "plain-empty" };
        out.put("session_responder", label, &steps(header, &t, true, false));
        let (mut a, mut b) = (empty(signed, 1), p.b.clone());
        let (_, t) = fixture::run_plain(&mut a, &mut b, Retained::default());
        out.put("session_initiator", label, &steps(header, &t, false, false));
        messages.extend(t.into_iter().map(|(_, m)| m));
    }

    // Authorized sessions: a1 with b1 (first and later), and refused peers.
    let p = &pairs().signed;
    for later in [false, true] {
        let (mut a, mut b, retained) = if later {
            (p.later_a.clone(), p.later_b.clone(), p.retained)
        } else {
            (p.a.clone(), p.b.clone(), Retained::default())
        };
        let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
        let (_, _, t) = fixture::run_auth("a1", &mut a, &mut da, "b1", &mut b, &mut db, retained);
        let header = u8::from(later) << 1;
        let label = if later { "later" } else { "first" };
        out.put("auth_responder", label, &steps(header, &t, true, false));
        out.put("auth_responder", &format!("{label}-noisy"), &steps(header, &t, true, true));
        out.put("auth_initiator", label, &steps(header, &t, false, false));
        out.put("auth_initiator", &format!("{label}-noisy"), &steps(header, &t, false, true));
        messages.extend(t.into_iter().map(|(_, m)| m));
    }
    {
        // c1 (no member) asks b1; a1 asks c1.
        let (mut a, mut b) = (Replica::new_signed(5, w.folder.scope()), p.b.clone());
        let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
        let (_, _, t) = fixture::run_auth("c1", &mut a, &mut da, "b1", &mut b, &mut db, Retained::default());
        out.put("auth_responder", "from-c1", &steps(2 << 2, &t, true, false));
        messages.extend(t.into_iter().map(|(_, m)| m));
        let (mut a, mut b) = (p.a.clone(), Replica::new_signed(6, w.folder.scope()));
        let (mut da, mut db) = (w.dir.clone(), w.dir.clone());
        let (_, _, t) = fixture::run_auth("a1", &mut a, &mut da, "c1", &mut b, &mut db, Retained::default());
        out.put("auth_initiator", "to-c1", &steps(2 << 2, &t, false, false));
        messages.extend(t.into_iter().map(|(_, m)| m));
        // a directory the responder lacks part of: b1 knows only the first changes.
        let mut short = engine::directory::Directory::new();
        short.apply(&w.changes[..w.changes.len() - 1]).expect("a prefix of the log applies");
        let (mut a, mut b) = (p.a.clone(), p.b.clone());
        let mut da = w.dir.clone();
        let (_, _, t) =
            fixture::run_auth("a1", &mut a, &mut da, "b1", &mut b, &mut short, Retained::default());
        out.put("auth_initiator", "responder-behind", &steps(0, &t, false, false));
        messages.extend(t.into_iter().map(|(_, m)| m));
    }

    // Every recorded message, alone; and the items they carry.
    messages.sort();
    messages.dedup();
    let mut items: Vec<WireItem> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        out.put("wire_message", &format!("{i:03}"), m);
        let mut f = vec![0u8];
        push_message(&mut f, m);
        if let Ok(message) = wire::decode(m, 1 << 20) {
            match message.body {
                Body::Hello { push: Some(push), .. } => items.extend(push.items),
                Body::Changes { items: i, .. }
                | Body::Diff { items: i, .. }
                | Body::Items { items: i, .. } => items.extend(i),
                _ => {}
            }
        }
    }
    items.sort_by_key(|i| postcard::to_allocvec(i).unwrap_or_default());
    items.dedup();
    for (i, item) in items.iter().enumerate() {
        out.put("wire_item", &format!("{i:03}"), &postcard::to_allocvec(item).expect("encodes"));
    }
    for (i, a) in items.iter().enumerate() {
        for (j, b) in items.iter().enumerate() {
            if i < j && a.id == b.id {
                let mut bytes = postcard::to_allocvec(a).expect("encodes");
                bytes.extend(postcard::to_allocvec(b).expect("encodes"));
                out.put("wire_item", &format!("pair-{i:03}-{j:03}"), &bytes);
            }
        }
    }

    batch_signed_seeds(&mut out);
    directory_seeds(&mut out);
    ticket_seeds(&mut out);
    feed_seeds(&mut out);
    control_and_frame_seeds(&mut out, &messages);
    relay_seeds(&mut out);
    cloud_seeds(&mut out);
    println!("{} seeds in {}", out.written.len(), out.root.display());
}

/// Items of a bulk write (batch signatures of depth 1 to 3, issue 16) as `wire_item` seeds, and
/// a signed session that carries them, from both sides.
fn batch_signed_seeds(out: &mut Out) {
    let w = world();
    let when = engine::feedsync::When::from_unix_secs(1_700_000_100).expect("a valid time");
    let mut a = Replica::new_signed(7, w.folder.scope());
    for (n, label) in [(2, "b2"), (3, "b3"), (8, "b8")] {
        let changes: Vec<_> = (0..n)
            .map(|i| {
                let id = engine::feedsync::ItemId::new(&format!("{label}-{i}")).expect("valid id");
                let content = engine::feedsync::Content {
                    inner: format!("<title>{label} {i}</title>").into(),
                    ..engine::feedsync::Content::empty()
                };
                (
                    id,
                    engine::feedsync::Edit {
                        content: Some(std::sync::Arc::new(content)),
                        ..Default::default()
                    },
                )
            })
            .collect();
        a.change_signed_many(w.key("a1"), &when, &changes).expect("a bulk write");
    }
    for (i, item) in a.items().enumerate() {
        out.put(
            "wire_item",
            &format!("batch-{i:03}"),
            &postcard::to_allocvec(&wire::to_wire(item)).expect("encodes"),
        );
    }
    let mut b = Replica::new_signed(8, w.folder.scope());
    let (_, transcript) = fixture::run_plain(&mut a, &mut b, Retained::default());
    out.put("session_responder", "batch-signed", &steps(0x01, &transcript, true, false));
    out.put("session_initiator", "batch-signed", &steps(0x01, &transcript, false, false));
}

fn empty(signed: bool, epoch: u64) -> Replica {
    if signed {
        Replica::new_signed(epoch, world().folder.scope())
    } else {
        Replica::new(epoch)
    }
}

fn with_mode(mode: u8, bytes: Vec<u8>) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend(bytes);
    out
}

fn directory_seeds(out: &mut Out) {
    let w = world();
    let changes: &[SignedChange] = &w.changes;
    out.put("directory", "all", &with_mode(0, postcard::to_allocvec(changes).expect("encodes")));
    out.put(
        "directory",
        "last",
        &with_mode(0, postcard::to_allocvec(&changes[changes.len() - 1..]).expect("encodes")),
    );
    let mut reversed = changes.to_vec();
    reversed.reverse();
    out.put("directory", "reversed", &with_mode(0, postcard::to_allocvec(&reversed).expect("encodes")));
    let user = |name: &str| UserId::of_first_device(w.device(name));
    let idx = |name: &str| fixture::NAMES.iter().position(|n| *n == name).unwrap_or(0) as u8;
    let draft =
        |author: &str, when: i64, op: Op| Draft { author: idx(author), seq: None, deps: None, when, op };
    let folder = w.folder;
    let batches: Vec<(&str, Vec<Draft>)> = vec![
        ("carol-folder", vec![draft("c1", 10, Op::CreateFolder { name: "carol's".into() })]),
        (
            "invite-carol",
            vec![draft("a1", 10, Op::Invite { folder, invitee: user("c1"), role: Role::Admin })],
        ),
        ("remove-bob", vec![draft("a1", 10, Op::RemoveMember { folder, user: user("b1") })]),
        ("bob-leaves", vec![draft("b1", 10, Op::RemoveMember { folder, user: user("b1") })]),
        ("unmap-a2", vec![draft("a2", 10, Op::Unmap { folder, device: w.device("a2") })]),
        ("remove-a2", vec![draft("a1", 10, Op::RemoveDevice { user: user("a1"), device: w.device("a2") })]),
        (
            "concurrent",
            vec![
                draft("a1", 10, Op::RemoveMember { folder, user: user("b1") }),
                Draft {
                    deps: Some(vec![(idx("a1"), 6), (idx("b1"), 3), (idx("a2"), 2), (idx("c1"), 1)]),
                    ..draft("b1", 11, Op::Unmap { folder, device: w.device("b1") })
                },
            ],
        ),
        (
            "pair-stranger",
            vec![draft(
                "a1",
                10,
                Op::AddDevice {
                    user: user("a1"),
                    pairing: Pairing {
                        device: w.device("stranger"),
                        nonce_existing: [1; 32],
                        nonce_new: [2; 32],
                        consent: Sig64([0; 64]),
                    },
                },
            )],
        ),
        ("stranger-user", vec![draft("stranger", 10, Op::CreateUser { name: "mallory".into() })]),
        ("cloud-map", vec![draft("cloud", 10, Op::Map { folder })]),
        (
            "resend-cancel",
            vec![draft("a1", 10, Op::Resend { invitation: engine::directory::InviteId([0; 16]) })],
        ),
    ];
    for (label, drafts) in batches {
        out.put("directory", label, &with_mode(1, postcard::to_allocvec(&drafts).expect("encodes")));
    }
    // An invitation that is accepted and a folder that is then mapped, in one batch.
    let invite = draft("a1", 10, Op::Invite { folder, invitee: user("c1"), role: Role::Member });
    let heads = w.dir.heads();
    let a1_seq = heads.get(&w.device("a1")).copied().unwrap_or(0) + 1;
    let mut probe = w.dir.clone();
    let invite_change = probe.make(w.key("a1"), 10, invite.op.clone()).expect("a1 may invite");
    assert_eq!(invite_change.body.seq, a1_seq);
    let invitation = invite_change.invite_id();
    let flow = vec![
        invite,
        draft("c1", 11, Op::Accept { invitation }),
        draft("c1", 12, Op::Map { folder }),
        draft("a1", 13, Op::RemoveMember { folder, user: user("c1") }),
    ];
    out.put(
        "directory",
        "invite-accept-map-remove",
        &with_mode(1, postcard::to_allocvec(&flow).expect("encodes")),
    );
}

fn ticket_seeds(out: &mut Out) {
    let w = world();
    let check = |name: &str, now_us: u64| TicketCheck { now_us, peer: w.channel(name).0, folder: w.folder.0 };
    for (name, ticket) in &w.tickets {
        let bytes = postcard::to_allocvec(&(ticket, check(name, T0 + 1))).expect("encodes");
        out.put("ticket", &format!("raw-{name}"), &with_mode(0, bytes));
    }
    let a1 = &w.tickets["a1"];
    out.put(
        "ticket",
        "raw-replayed",
        &with_mode(0, postcard::to_allocvec(&(a1, check("b1", T0))).expect("encodes")),
    );
    out.put(
        "ticket",
        "raw-expired",
        &with_mode(0, postcard::to_allocvec(&(a1, check("a1", T0 + 3_600_000_000))).expect("encodes")),
    );
    let body = |folders: Vec<FolderId>, issued: u64, expires: u64| TicketBody {
        device: w.device("a1"),
        channel: ChannelKey(w.channel("a1").0),
        rights: Rights { folders, relay: true },
        issued_us: issued,
        expires_us: expires,
        serial: 1,
    };
    let bodies = [
        ("signed-good", body(vec![w.folder], T0, T0 + 600_000_000), check("a1", T0)),
        ("signed-unsorted", body(vec![FolderId([9; 16]), w.folder], T0, T0 + 600_000_000), check("a1", T0)),
        ("signed-long", body(vec![w.folder], T0, T0 + 7_200_000_000), check("a1", T0)),
        ("signed-early", body(vec![w.folder], T0 + 600_000_000, T0 + 1_200_000_000), check("a1", T0)),
        ("signed-wrap", body(vec![], u64::MAX - 5, u64::MAX), check("a1", u64::MAX - 1)),
    ];
    for (label, body, check) in bodies {
        out.put("ticket", label, &with_mode(1, postcard::to_allocvec(&(body, check)).expect("encodes")));
    }
}

fn feed_seeds(out: &mut Out) {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(here.join("../fuzz/seeds")).expect("fuzz/seeds") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("a file name").to_string_lossy().into_owned();
        out.put("read_feed", &name, &std::fs::read(&path).expect("readable"));
    }
    out.put("read_feed", "news.xml", write_feed(&world().dir.news()).as_bytes());
    for (label, replica) in [("plain", &pairs().plain.b), ("signed", &pairs().signed.b)] {
        for dialect in [Dialect::Atom, Dialect::Rss] {
            let feed =
                transport::view::feed_of(dialect, replica.items().map(|i| &**i)).expect("a feed of items");
            out.put("read_feed", &format!("{label}-{dialect:?}.xml"), write_feed(&feed).as_bytes());
        }
    }
}

fn control_and_frame_seeds(out: &mut Out, messages: &[Vec<u8>]) {
    let w = world();
    let addr = engine::control::PeerAddr {
        device: w.device("a1"),
        relay: Some("https://relay.example/".into()),
        direct: vec!["192.0.2.1:4433".parse().expect("literal")],
    };
    let pairing = Pairing {
        device: w.device("stranger"),
        nonce_existing: [1; 32],
        nonce_new: [2; 32],
        consent: Sig64([3; 64]),
    };
    let requests = vec![
        ("ticket", Request::Ticket),
        (
            "directory",
            Request::Directory {
                heads: w.dir.heads().into_iter().collect(),
                changes: w.changes[..2].to_vec(),
            },
        ),
        ("directory-empty", Request::Directory { heads: Vec::new(), changes: Vec::new() }),
        ("announce", Request::Announce { addr: addr.clone() }),
        ("peers", Request::Peers { folder: w.folder }),
        ("account", Request::Account { name: "alice".into(), password: "correct horse".into() }),
        (
            "pair-request",
            Request::PairRequest { account: "alice".into(), password: "pw".into(), commitment: [5; 32] },
        ),
        ("pair-status", Request::PairStatus { id: 1 }),
        ("pair-consent", Request::PairConsent { id: 1, pairing: pairing.clone() }),
        ("pair-list", Request::PairList),
        ("pair-nonce", Request::PairNonce { id: 1, nonce: [6; 32] }),
    ];
    let view = PairView {
        id: 1,
        user: UserId::of_first_device(w.device("a1")),
        device: w.device("stranger"),
        commitment: [5; 32],
        existing: Some((w.device("a1"), [1; 32])),
        pairing: Some(pairing),
    };
    let responses = vec![
        ("ok", Response::Ok),
        ("refused", Response::Refused(engine::control::ControlError::NotActive)),
        ("ticket", Response::Ticket { ticket: w.tickets["a1"].clone(), cloud: w.cloud() }),
        ("directory", Response::Directory { changes: w.changes.clone() }),
        ("peers", Response::Peers { peers: vec![addr] }),
        ("pair-id", Response::PairId { id: 3 }),
        ("pair-status", Response::PairStatus(view.clone())),
        ("pairings", Response::Pairings(vec![view])),
    ];
    let notices = [
        ("folder", Notice::Folder(w.folder)),
        ("directory", Notice::Directory),
        ("pairing", Notice::Pairing),
    ];
    let mut frames: Vec<Vec<u8>> = vec![engine::control::encode(&Open::Sync)];
    for (label, request) in &requests {
        let open = engine::control::encode(&Open::Control(request.clone()));
        out.put("control", &format!("open-{label}"), &with_mode(0, open.clone()));
        out.put("control", &format!("request-{label}"), &with_mode(1, engine::control::encode(request)));
        frames.push(open);
        // From each fixture device, to the relay.
        for who in [0u8, 2, 3, 5] {
            let bytes = with_mode(who, engine::control::encode(request));
            out.put("relay_control", &format!("{label}-{}", fixture::NAMES[usize::from(who)]), &bytes);
        }
    }
    out.put("control", "open-sync", &with_mode(0, engine::control::encode(&Open::Sync)));
    // Live Folders: a content request and an upload as they open streams, and the replies.
    let folder = engine::directory::FolderId([7; 16]);
    let content = Open::Content { folder, root: [9; 32], size: 100_000, start: 0, end: 7 };
    out.put("control", "open-content", &with_mode(0, engine::control::encode(&content)));
    let upload = Open::Upload { folder, root: [9; 32], size: 100_000, epoch: 1 };
    out.put("control", "open-upload", &with_mode(0, engine::control::encode(&upload)));
    let sealed = engine::control::ContentReply::Sealed { epoch: 1 };
    out.put("control", "content-reply-sealed", &with_mode(4, engine::control::encode(&sealed)));
    let need = engine::control::UploadReply {
        state: engine::control::UploadState::Need(vec![(0, 3), (5, 7)]),
        used: 1 << 20,
        quota: 5_000_000_000,
    };
    out.put("control", "upload-reply-need", &with_mode(5, engine::control::encode(&need)));
    for (label, response) in &responses {
        out.put("control", &format!("response-{label}"), &with_mode(2, engine::control::encode(response)));
    }
    for (label, notice) in &notices {
        out.put("control", &format!("notice-{label}"), &with_mode(3, engine::control::encode(notice)));
    }
    // Frames: an Open then session messages, under each limit, whole and in small chunks.
    let mut stream = Vec::new();
    for frame in frames.iter().take(2).chain(messages.iter().take(4)) {
        stream.extend((frame.len() as u32).to_be_bytes());
        stream.extend(frame);
    }
    for limit in 0u8..4 {
        for (label, sizes) in [("whole", &[][..]), ("chunked", &[1u8, 3, 7, 2][..])] {
            let mut input = vec![limit, sizes.len() as u8];
            input.extend(sizes);
            input.extend(&stream);
            out.put("frame", &format!("{label}-{limit}"), &input);
        }
    }
    out.put("frame", "truncated", &[1, 0, 0, 0, 0, 9, 1, 2]);
    out.put("frame", "too-large", &[0, 0, 0, 0, 1, 0]);
}

fn relay_seeds(out: &mut Out) {
    let w = world();
    let folder = hex(&w.folder.0);
    let feed = transport::view::feed_of(Dialect::Atom, pairs().signed.later_b.items().map(|i| &**i))
        .expect("a feed");
    let posted = write_feed(&feed);
    // (label, route, auth, flags, param, query, body)
    type Http<'a> = (&'a str, u8, u8, u8, &'a str, &'a str, &'a [u8]);
    let requests: Vec<Http<'_>> = vec![
        ("health", 0, 0, 0, "", "", b""),
        ("metrics", 1, 0, 0, "", "", b""),
        ("connect", 2, 0, 0, "", "", b""),
        ("login", 3, 0, 4, "", "", br#"{"account":"alice","password":"pw"}"#),
        ("login-bad", 3, 0, 4, "", "", br#"{"account":1}"#),
        ("logout", 4, 2, 0, "", "", b""),
        ("account-token", 5, 1, 0, "alice", "", b""),
        ("users", 6, 2, 0, "", "", b""),
        ("user", 7, 1, 2, "", "", b""),
        ("devices", 8, 2, 0, "", "", b""),
        ("folders", 9, 2, 0, "", "", b""),
        ("folder", 10, 2, 1, "", "", b""),
        ("members", 11, 1, 1, "", "", b""),
        ("invitations", 12, 2, 0, "", "", b""),
        ("items", 13, 2, 1, "", "", b""),
        ("item", 14, 1, 1, "", "", b""),
        ("feed-atom", 15, 2, 1, "", "since=1&epoch=77", b""),
        ("post-feed", 16, 2, 1, "", "", posted.as_bytes()),
        ("post-garbage", 16, 1, 1, "", "", b"<rss"),
        ("notifications", 17, 2, 0, "", "since=0&timeout=30", b""),
        ("raw-path", 40, 1, 0, "/v1/folders/zz/items/%ff", "", b""),
        ("bad-folder", 10, 1, 0, &folder[..10], "", b""),
    ];
    for (label, route, auth, flags, param, query, body) in requests {
        let mut input = vec![route, auth, flags, param.len() as u8];
        input.extend(param.as_bytes());
        input.push(query.len() as u8);
        input.extend(query.as_bytes());
        input.extend(body);
        out.put("relay_http", label, &input);
    }
}

/// `cloud_control`: a pairing through the mailbox, a directory push and pull, announcements,
/// peers and tickets, each a step `(device byte, control frame)`.
fn cloud_seeds(out: &mut Out) {
    use engine::control::{self, PeerAddr, Request as Req};
    use engine::directory::{pair_new_device, pairing_commitment, short_code, UserId};
    let w = world();
    // a1, a2, b1, c1, cloud, stranger: the device byte is the index in `NAMES`.
    let step = |input: &mut Vec<u8>, who: u8, request: &Req| {
        let mut frame = vec![who];
        frame.extend(control::encode(request));
        push_message(input, &frame);
    };
    let mut basics = Vec::new();
    for who in 0..6u8 {
        step(&mut basics, who, &Req::Ticket);
        let addr = PeerAddr {
            device: w.device(fixture::NAMES[usize::from(who)]),
            relay: None,
            direct: vec!["192.0.2.1:4433".parse().expect("literal")],
        };
        step(&mut basics, who, &Req::Announce { addr });
        step(&mut basics, who, &Req::Peers { folder: w.folder });
    }
    out.put("cloud_control", "tickets-announce-peers", &basics);
    let mut dir = Vec::new();
    step(&mut dir, 3, &Req::Directory { heads: vec![], changes: vec![] });
    let half = w.changes.len() / 2;
    step(&mut dir, 0, &Req::Directory { heads: vec![], changes: w.changes[half..].to_vec() });
    out.put("cloud_control", "directory", &dir);
    // The stranger pairs into Alice's user through a1.
    let alice = UserId::of_first_device(w.device("a1"));
    let (stranger, a1) = (w.device("stranger"), w.device("a1"));
    let (nonce_existing, nonce_new) = ([5u8; 32], [6u8; 32]);
    let commitment = pairing_commitment(&stranger, &nonce_new);
    let code = short_code(&a1, &stranger, &nonce_existing, &nonce_new);
    let pairing =
        pair_new_device(w.key("stranger"), alice, a1, nonce_existing, nonce_new, code).expect("valid");
    let mut pair = Vec::new();
    step(
        &mut pair,
        0x80 | 5,
        &Req::PairRequest { account: "alice".into(), password: "pw".into(), commitment },
    );
    step(&mut pair, 0, &Req::PairList);
    step(&mut pair, 0, &Req::PairNonce { id: 1, nonce: nonce_existing });
    step(&mut pair, 5, &Req::PairStatus { id: 1 });
    step(&mut pair, 5, &Req::PairConsent { id: 1, pairing: pairing.clone() });
    step(&mut pair, 5, &Req::PairStatus { id: 1 });
    let mut alices = w.dir.clone();
    let added = alices.add_paired_device(w.key("a1"), alice, commitment, pairing, code, 20).expect("valid");
    step(&mut pair, 0, &Req::Directory { heads: vec![], changes: vec![added] });
    step(&mut pair, 0, &Req::PairList);
    step(&mut pair, 5, &Req::Ticket);
    out.put("cloud_control", "pairing", &pair);
}

/// Live Folders: file entries and paths as peers send them, and bao responses for every choice of
/// groups of the `blob_response` target's file (plus a forged one).
fn folder_seeds(out: &mut Out) {
    use engine::folder::blob::{encode, Outboard};
    use engine::folder::fetch::GROUP_BYTES;
    use engine::folder::{ContentHash, FileEntry, FilePath};
    for (label, path) in
        [("plain", "a.txt"), ("deep", "d/e/f/g.bin"), ("escaped", "x/<&\"'>.md"), ("unicode", "ünï/名前")]
    {
        let entry = FileEntry {
            path: FilePath::new(path).expect("a valid path"),
            size: 1234,
            mtime_ns: 1_800_000_000_000_000_000,
            executable: label == "deep",
            root: ContentHash::of(path.as_bytes()),
        };
        out.put("folder_entry", label, entry.to_content().inner.as_bytes());
    }
    for (label, text) in [
        ("dots", "a/../../etc"),
        ("absolute", "/etc/passwd"),
        ("windows", "con.txt"),
        ("reserved", ".feedmesh/x"),
    ] {
        out.put("folder_entry", &format!("path-{label}"), text.as_bytes());
    }
    let file: Vec<u8> = (0..(3 * GROUP_BYTES + GROUP_BYTES / 2) as usize).map(|i| (i % 251) as u8).collect();
    let outboard = Outboard::of(&file);
    for pick in 0u8..16 {
        let total = 4u64;
        let start = u64::from(pick % 4).min(total - 1);
        let end = (start + 1 + u64::from(pick / 4 % 4)).min(total);
        let mut seed = vec![pick];
        seed.extend(encode(&file, &outboard, start..end).expect("a response"));
        out.put("blob_response", &format!("pick-{pick}-groups-{start}-{end}"), &seed);
    }
    let other: Vec<u8> = file.iter().map(|b| b ^ 1).collect();
    let mut forged = vec![0u8];
    forged.extend(encode(&other, &Outboard::of(&other), 0..1).expect("a response"));
    out.put("blob_response", "forged", &forged);
}

//! Device commands. The same [`Cmd`] runs in the CLI process (when no daemon holds the database)
//! or inside the daemon (the CLI sends it to the local API), so both paths behave alike.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Subcommand, ValueEnum};
use engine::directory::{InviteId, InviteState, MemberState, Op, Role};
use engine::feedsync::{read_feed, Edit, ItemId};
use engine::signing::hex;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use transport::{Request, Response};

use crate::net::{self, lock, Net, Shared};
use crate::state::{content, title_and_body};

#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum Cmd {
    /// This device, its user and the cloud.
    Whoami,
    /// Devices of this user.
    Device {
        #[command(subcommand)]
        command: DeviceCmd,
    },
    /// Set up (or change the password of) this user's cloud account. The password comes from
    /// $FEEDMESH_PASSWORD or stdin.
    Account {
        /// The account name (1 to 64 of a-z, 0-9, '.', '_', '-').
        name: String,
        #[arg(skip)]
        password: Option<String>,
    },
    /// Folders: create, share, accept or decline invitations, map on this device.
    Folder {
        #[command(subcommand)]
        command: FolderCmd,
    },
    /// Invitations this user sent or received.
    Invite {
        #[command(subcommand)]
        command: InviteCmd,
    },
    /// Folder membership.
    Member {
        #[command(subcommand)]
        command: MemberCmd,
    },
    /// Create or update an item: `put FOLDER ID [TEXT] [--title T] [--file F]`.
    Put {
        /// Folder name or id.
        folder: String,
        /// Item id (1 to 1024 bytes of letters, digits and ()+,-.:=@;$_!*'/?#, or %XX).
        id: String,
        /// The item's text (at most 256 KiB; or --file).
        text: Option<String>,
        /// The item's title.
        #[arg(long)]
        title: Option<String>,
        /// Read the text from a file.
        #[arg(long, conflicts_with = "text")]
        file: Option<PathBuf>,
    },
    /// Show an item.
    Get {
        /// Folder name or id.
        folder: String,
        /// Item id.
        id: String,
    },
    /// Delete an item (a tombstone that syncs).
    Rm {
        /// Folder name or id.
        folder: String,
        /// Item id.
        id: String,
    },
    /// List a folder's items.
    Ls {
        /// Folder name or id.
        folder: String,
        /// Include deleted items.
        #[arg(long)]
        all: bool,
    },
    /// Resolve an item's conflicts (optionally with new text).
    Resolve {
        /// Folder name or id.
        folder: String,
        /// Item id.
        id: String,
        /// New text for the item (default: the winner's).
        text: Option<String>,
    },
    /// Items of a folder that have conflicts, with every version.
    Conflicts {
        /// Folder name or id.
        folder: String,
    },
    /// The directory's news (users, devices, folders, members) as a feed.
    News {
        /// Document kind.
        #[arg(long, value_enum, default_value = "atom")]
        format: Format,
    },
    /// Cloud connection, peers (LAN, direct or relayed, and why), pending changes, and per
    /// mapped folder the files still needed (from where, how fast, or why not) and how its
    /// content stands at the cloud.
    Status {
        /// Follow the transfers live, a progress bar per file on a terminal, until nothing is
        /// needed any more (needs the daemon).
        #[arg(long)]
        watch: bool,
    },
    /// One sync round now (directory, ticket, every folder with the cloud and peers).
    Sync,
    /// Write a folder as a feed: Atom (RFC 4287) or RSS 2.0 with FeedSync's `sx:sync` in every
    /// entry (what `import` reads back), or JSON Feed 1.1.
    Export {
        /// Folder name or id.
        folder: String,
        /// Document kind.
        #[arg(long, value_enum, default_value = "atom")]
        format: Format,
        /// Output file (default: stdout).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Merge a FeedSync feed into a folder: signed versions are merged as they are; others are
    /// written again as this device's changes.
    Import {
        /// Folder name or id.
        folder: String,
        /// A FeedSync feed (RSS 2.0 or Atom), e.g. one `export` wrote.
        file: PathBuf,
        #[arg(skip)]
        bytes: Option<Vec<u8>>,
    },
}

#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum DeviceCmd {
    /// List this user's devices.
    Ls,
    /// Remove a device of this user (it loses access at once).
    Remove {
        /// Device id (or a prefix of at least 4 hex digits).
        device: String,
    },
    /// Approve a pairing whose code the new device shows.
    Approve {
        /// The six-digit code the new device shows.
        code: String,
    },
}

#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum FolderCmd {
    /// Create a folder owned by this user (mapped on this device).
    Create {
        /// The folder's name.
        name: String,
        /// Keep the files' content between devices only: the cloud keeps the metadata and never
        /// a byte of content (default: content is also kept at the cloud, sealed, within quota).
        #[arg(long)]
        p2p: bool,
    },
    /// Where a folder's file content is kept: `cloud` (also at the cloud, sealed with the
    /// folder's key, so a device can fetch while every other one is off) or `p2p` (between
    /// devices only). By the owner or an admin.
    Storage {
        /// Folder name or id.
        folder: String,
        /// `cloud` or `p2p`.
        #[arg(value_parser = ["cloud", "p2p"])]
        storage: String,
    },
    /// Folders this user can see, and open invitations.
    Ls,
    /// Invite a user (by name or id) to a folder.
    Share {
        /// Folder name or id.
        folder: String,
        /// User name or id.
        user: String,
        /// Invite as an admin (may invite and remove others).
        #[arg(long)]
        admin: bool,
    },
    /// Accept an invitation (by invitation id or folder name) and map the folder here.
    Accept {
        /// Invitation id (prefix) or the folder's name.
        invitation: String,
    },
    /// Decline an invitation.
    Decline {
        /// Invitation id (prefix) or the folder's name.
        invitation: String,
    },
    /// Map a folder on this device (it starts syncing), and with DIR keep it the same as that
    /// directory: its files are published, the folder's files written there (see `folder scan`).
    Map {
        /// Folder name or id.
        folder: String,
        /// A directory to keep the folder's files in (created if missing; files already there
        /// are published).
        #[arg(value_name = "DIR")]
        path: Option<PathBuf>,
    },
    /// Bring a mapped directory and its folder together now (the daemon does it every round):
    /// publish local changes, write and remove files as the folder says, keep conflict copies.
    Scan {
        /// Folder name or id.
        folder: String,
    },
    /// Unmap a folder from this device (or another device of this user); a mapped directory's
    /// files stay where they are.
    Unmap {
        /// Folder name or id.
        folder: String,
        /// Another device of this user (default: this one).
        #[arg(long)]
        device: Option<String>,
    },
    /// Members of a folder.
    Members {
        /// Folder name or id.
        folder: String,
    },
}

#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum InviteCmd {
    /// Invitations sent or received.
    Ls,
    /// Send an open invitation again.
    Resend {
        /// Invitation id (prefix).
        invitation: String,
    },
    /// Cancel an open invitation.
    Cancel {
        /// Invitation id (prefix).
        invitation: String,
    },
}

#[derive(Subcommand, Debug, Clone, Serialize, Deserialize)]
pub enum MemberCmd {
    /// Remove a member from a folder (or leave it, naming yourself).
    Remove {
        /// Folder name or id.
        folder: String,
        /// User name or id (yourself to leave).
        user: String,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Format {
    /// RSS 2.0 with FeedSync.
    Rss,
    /// Atom 1.0 (RFC 4287) with FeedSync.
    Atom,
    /// JSON Feed 1.1 (FeedSync state in each item's `_feedsync`; not read back by `import`).
    Json,
}

/// A folder's feed in `format` (`transport::syndication`): the node's `export` and local API.
pub fn folder_document(
    n: &crate::state::Node,
    folder: &engine::directory::FolderId,
    format: Format,
) -> anyhow::Result<(String, usize)> {
    let f = n.dir().folder(folder).ok_or_else(|| anyhow!("no such folder"))?;
    let owner = n.dir().state().users.get(&f.owner).map(|u| u.name.clone()).unwrap_or_default();
    let meta = transport::syndication::Meta::folder(&hex(&folder.0), &f.name, &owner, now_when()?);
    let mut items: Vec<&engine::feedsync::Item> =
        n.replica(folder).map(|r| r.items().map(|i| &**i).collect()).unwrap_or_default();
    items.sort_by(|a, b| a.id().as_str().cmp(b.id().as_str()));
    document(&meta, format, items)
}

/// The directory's news feed in `format`.
pub fn news_document(n: &crate::state::Node, format: Format) -> anyhow::Result<(String, usize)> {
    let meta = transport::syndication::Meta::news(&hex(&n.cfg.cloud.0), now_when()?);
    let news = n.dir().news();
    document(&meta, format, news.items())
}

fn now_when() -> anyhow::Result<engine::feedsync::When> {
    engine::feedsync::When::from_unix_secs(transport::now_secs()).map_err(|e| anyhow!("the clock: {e}"))
}

fn document<'a>(
    meta: &transport::syndication::Meta,
    format: Format,
    items: impl IntoIterator<Item = &'a engine::feedsync::Item>,
) -> anyhow::Result<(String, usize)> {
    let items: Vec<&engine::feedsync::Item> = items.into_iter().collect();
    let len = items.len();
    let text = match format {
        Format::Rss => transport::syndication::rss(meta, items).map_err(|e| anyhow!("{e}"))?,
        Format::Atom => transport::syndication::atom(meta, items).map_err(|e| anyhow!("{e}"))?,
        Format::Json => {
            let mut text = serde_json::to_string_pretty(&transport::syndication::json_feed(meta, items))?;
            text.push('\n');
            text
        }
    };
    Ok((text, len))
}

/// Where commands get the network from.
#[derive(Debug)]
pub struct Ctx {
    pub node: Shared,
    net: OnceCell<Arc<Net>>,
    bind: Option<std::net::SocketAddr>,
    relay_only: bool,
}

impl Ctx {
    pub fn new(node: Shared, net: Option<Arc<Net>>) -> Self {
        let cell = OnceCell::new();
        if let Some(n) = net {
            let _ = cell.set(n);
        }
        Self { node, net: cell, bind: None, relay_only: false }
    }

    /// A context whose network is bound on first use with these options (the daemon's).
    pub fn with_options(node: Shared, bind: Option<std::net::SocketAddr>, relay_only: bool) -> Self {
        Self { node, net: OnceCell::new(), bind, relay_only }
    }

    /// The network (bound on first use).
    pub async fn net(&self) -> anyhow::Result<Arc<Net>> {
        self.net
            .get_or_try_init(|| Net::bind_with(self.node.clone(), self.bind, self.relay_only))
            .await
            .cloned()
    }

    /// Closes the endpoint if this process bound one (the CLI, when done).
    /// Bounded: a graceful close can wait on the relay for seconds, and the process holds the
    /// database until it exits.
    pub async fn close(&self) {
        if let Some(n) = self.net.get() {
            let _ = tokio::time::timeout(Duration::from_millis(300), n.endpoint.close()).await;
        }
    }

    /// Wakes a daemon's sync loop after a change (nothing in the CLI process).
    fn changed(&self) {
        if let Some(n) = self.net.get() {
            n.wake.notify_one();
        }
    }
}

fn find_invitation(node: &crate::state::Node, text: &str) -> anyhow::Result<InviteId> {
    let st = node.dir().state();
    let me = node.user();
    let matches: Vec<InviteId> = st
        .invitations
        .iter()
        .filter(|(id, inv)| {
            (text.len() >= 4 && hex(&id.0).starts_with(&text.to_lowercase()))
                || (inv.state == InviteState::Open
                    && Some(inv.invitee) == me
                    && st.folders.get(&inv.folder).is_some_and(|f| f.name == text))
        })
        .map(|(id, _)| *id)
        .collect();
    match matches.len() {
        1 => Ok(matches[0]),
        0 => Err(anyhow::Error::new(crate::state::NotFound(format!(
            "no invitation {text:?} (see `feedmesh invite ls`)"
        )))),
        n => bail!("{text:?} matches {n} invitations: use the id"),
    }
}

fn short(bytes: &[u8]) -> String {
    hex(&bytes[..8.min(bytes.len())])
}

/// Runs one command; the text to print. A name that matches nothing may be one the directory
/// has not heard of yet: then the directory is refreshed from the cloud (briefly) and the command
/// tried once more.
pub async fn exec(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<String> {
    let changes_directory = matches!(
        cmd,
        Cmd::Device { command: DeviceCmd::Remove { .. } }
            | Cmd::Folder { .. }
            | Cmd::Invite { command: InviteCmd::Resend { .. } | InviteCmd::Cancel { .. } }
            | Cmd::Member { .. }
    );
    let out = exec_retrying(ctx, cmd).await?;
    // In the daemon, a directory change reaches the cloud before the command returns (so the
    // other side can act on it at once); the CLI alone leaves it to the next `sync` or `run`.
    if changes_directory {
        if let Some(net) = ctx.net.get() {
            let _ = tokio::time::timeout(Duration::from_secs(5), net.sync_directory()).await;
        }
    }
    Ok(out)
}

async fn exec_retrying(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<String> {
    match exec_once(ctx, cmd.clone()).await {
        Err(e) if e.downcast_ref::<crate::state::NotFound>().is_some() => {
            let refreshed = async {
                let net = ctx.net().await?;
                net.sync_directory().await
            };
            match tokio::time::timeout(Duration::from_secs(5), refreshed).await {
                Ok(Ok(n)) if n > 0 => exec_once(ctx, cmd).await,
                _ => Err(e),
            }
        }
        other => other,
    }
}

async fn exec_once(ctx: &Ctx, cmd: Cmd) -> anyhow::Result<String> {
    let node = &ctx.node;
    match cmd {
        Cmd::Whoami => {
            let n = lock(node);
            let user = n.user().map(|u| {
                let name = n.dir().state().users.get(&u).map(|x| x.name.clone()).unwrap_or_default();
                format!("{} ({name})", hex(&u.0))
            });
            Ok(format!(
                "device {}\nuser   {}\ncloud  {} via {}\n",
                hex(&n.id.0),
                user.unwrap_or_else(|| "none yet (pair this device, or it is the first: init --name)".into()),
                hex(&n.cfg.cloud.0),
                n.cfg.relay_url
            ))
        }
        Cmd::Device { command } => match command {
            DeviceCmd::Ls => {
                let n = lock(node);
                let user = n.user().ok_or_else(|| anyhow!("this device is not active in a user"))?;
                let u = n.dir().state().users.get(&user).ok_or_else(|| anyhow!("user missing"))?;
                let mut out = String::new();
                for (d, active) in &u.devices {
                    let me = if *d == n.id { " (this device)" } else { "" };
                    out.push_str(&format!(
                        "{} {}{me}\n",
                        hex(&d.0),
                        if *active { "active" } else { "removed" }
                    ));
                }
                Ok(out)
            }
            DeviceCmd::Remove { device } => {
                let mut n = lock(node);
                let user = n.user().ok_or_else(|| anyhow!("this device is not active in a user"))?;
                let device = n.find_device(&device)?;
                n.make(Op::RemoveDevice { user, device })?;
                drop(n);
                ctx.changed();
                Ok(format!("removed device {}\n", short(&device.0)))
            }
            DeviceCmd::Approve { code } => {
                let code: u32 = code.trim().parse().map_err(|_| anyhow!("the code is 6 digits"))?;
                let net = ctx.net().await?;
                net.answer_pairings().await?;
                let Response::Pairings(list) = net.request(Request::PairList).await? else {
                    bail!("unexpected answer");
                };
                let approved = {
                    let mut n = lock(node);
                    let user = n.user().ok_or_else(|| anyhow!("this device is not active in a user"))?;
                    let mut approved = None;
                    for p in list {
                        let (Some(pairing), Some((existing, _))) = (p.pairing.clone(), p.existing) else {
                            continue;
                        };
                        let Some(my_nonce) = n.pair_nonces.get(&p.id).copied() else { continue };
                        if existing != n.id || pairing.nonce_existing != my_nonce {
                            continue;
                        }
                        let device = pairing.device;
                        if n.add_paired_device(user, p.commitment, pairing, code).is_ok() {
                            approved = Some(device);
                            break;
                        }
                    }
                    approved
                };
                if let Some(device) = approved {
                    net.sync_directory().await?;
                    ctx.changed();
                    return Ok(format!("approved: device {} joined this user\n", short(&device.0)));
                }
                bail!("no pending pairing shows code {code:06} (wait for the new device to show its code, then retry)")
            }
        },
        Cmd::Account { name, password } => {
            let password = password.ok_or_else(|| anyhow!("no password given"))?;
            let net = ctx.net().await?;
            net.sync_directory().await?;
            net.request(Request::Account { name: name.clone(), password }).await?;
            Ok(format!("account {name} is set up on the cloud\n"))
        }
        Cmd::Folder { command } => folder_cmd(ctx, command).await,
        Cmd::Invite { command } => {
            let mut n = lock(node);
            match command {
                InviteCmd::Ls => {
                    let me = n.user();
                    let st = n.dir().state();
                    let mut out = String::new();
                    for (id, inv) in &st.invitations {
                        let folder = st.folders.get(&inv.folder);
                        let mine_out = folder.is_some_and(|f| Some(f.owner) == me);
                        if Some(inv.invitee) != me && !mine_out {
                            continue;
                        }
                        let who = st.users.get(&inv.invitee).map(|u| u.name.clone()).unwrap_or_default();
                        out.push_str(&format!(
                            "{} folder {} to {} {:?} sent {}x\n",
                            hex(&id.0),
                            folder.map(|f| f.name.clone()).unwrap_or_default(),
                            who,
                            inv.state,
                            inv.sent
                        ));
                    }
                    Ok(out)
                }
                InviteCmd::Resend { invitation } => {
                    let invitation = find_invitation(&n, &invitation)?;
                    n.make(Op::Resend { invitation })?;
                    drop(n);
                    ctx.changed();
                    Ok("invitation sent again\n".into())
                }
                InviteCmd::Cancel { invitation } => {
                    let invitation = find_invitation(&n, &invitation)?;
                    n.make(Op::Cancel { invitation })?;
                    drop(n);
                    ctx.changed();
                    Ok("invitation cancelled\n".into())
                }
            }
        }
        Cmd::Member { command: MemberCmd::Remove { folder, user } } => {
            let mut n = lock(node);
            let folder = n.folder(&folder)?;
            let user = n.find_user(&user)?;
            n.make(Op::RemoveMember { folder, user })?;
            drop(n);
            ctx.changed();
            Ok("member removed\n".into())
        }
        Cmd::Put { folder, id, text, title, file } => {
            let body = match (text, file) {
                (Some(t), _) => t,
                (None, Some(f)) => {
                    std::fs::read_to_string(&f).map_err(|e| anyhow!("{}: {e}", f.display()))?
                }
                (None, None) => String::new(),
            };
            let mut n = lock(node);
            let folder = n.folder(&folder)?;
            let item = n.put(&folder, &id, title.as_deref(), &body)?;
            drop(n);
            ctx.changed();
            Ok(format!("{} updates={}\n", item.id(), item.version.updates))
        }
        Cmd::Rm { folder, id } => {
            let mut n = lock(node);
            let folder = n.folder(&folder)?;
            n.remove(&folder, &id)?;
            drop(n);
            ctx.changed();
            Ok(format!("{id} deleted\n"))
        }
        Cmd::Resolve { folder, id, text } => {
            let mut n = lock(node);
            let folder = n.folder(&folder)?;
            let content = text.map(|t| {
                let fid = ItemId::new(&id).ok();
                let title = fid
                    .and_then(|fid| n.replica(&folder).and_then(|r| r.item(&fid)).cloned())
                    .and_then(|i| title_and_body(&i.version.content).0);
                content(title.as_deref(), &t)
            });
            let item = n.write(&folder, &id, Edit { content, resolve: true, ..Edit::default() })?;
            drop(n);
            ctx.changed();
            Ok(format!("{} resolved, updates={}\n", item.id(), item.version.updates))
        }
        Cmd::Get { folder, id } => {
            let n = lock(node);
            let folder = n.folder(&folder)?;
            let fid = ItemId::new(&id).map_err(|e| anyhow!("{e}"))?;
            let item =
                n.replica(&folder).and_then(|r| r.item(&fid)).ok_or_else(|| anyhow!("no item {id}"))?;
            let (title, body) = title_and_body(&item.version.content);
            let top = item.version.topmost();
            Ok(format!(
                "id:        {}\ntitle:     {}\nupdates:   {}\ndeleted:   {}\nby:        {}\nwhen:      {}\nconflicts: {}\n\n{}\n",
                item.id(),
                title.unwrap_or_default(),
                item.version.updates,
                item.version.deleted,
                top.by.as_ref().map(|b| b.as_str()).unwrap_or("-"),
                top.when.as_ref().map(|w| w.to_rfc3339()).unwrap_or_default(),
                item.conflicts.len(),
                body.unwrap_or_default()
            ))
        }
        Cmd::Ls { folder, all } => {
            let n = lock(node);
            let folder = n.folder(&folder)?;
            n.check_mapped(&folder)?;
            let mut out = String::new();
            if let Some(r) = n.replica(&folder) {
                let mut items: Vec<_> = r.items().filter(|i| all || !i.version.deleted).collect();
                items.sort_by(|a, b| a.id().as_str().cmp(b.id().as_str()));
                for i in items {
                    let (title, _) = title_and_body(&i.version.content);
                    let flags = format!(
                        "{}{}",
                        if i.version.deleted { " deleted" } else { "" },
                        if i.conflicts.is_empty() {
                            String::new()
                        } else {
                            format!(" conflicts={}", i.conflicts.len())
                        }
                    );
                    out.push_str(&format!(
                        "{}\t{}\tupdates={}{flags}\n",
                        i.id(),
                        title.unwrap_or_default(),
                        i.version.updates
                    ));
                }
            }
            Ok(out)
        }
        Cmd::Conflicts { folder } => {
            let n = lock(node);
            let folder = n.folder(&folder)?;
            let mut out = String::new();
            if let Some(r) = n.replica(&folder) {
                for i in r.items().filter(|i| !i.conflicts.is_empty()) {
                    out.push_str(&format!("{} ({} conflicts)\n", i.id(), i.conflicts.len()));
                    for (label, v) in std::iter::once(("winner", &i.version))
                        .chain(i.conflicts.iter().map(|c| ("conflict", c)))
                    {
                        let (_, body) = title_and_body(&v.content);
                        let top = v.topmost();
                        out.push_str(&format!(
                            "  {label:8} by {} at {}: {}\n",
                            top.by.as_ref().map(|b| b.as_str()).unwrap_or("-"),
                            top.when.as_ref().map(|w| w.to_rfc3339()).unwrap_or_default(),
                            body.unwrap_or_default()
                        ));
                    }
                }
            }
            if out.is_empty() {
                out.push_str("no conflicts\n");
            }
            Ok(out)
        }
        Cmd::Status { .. } => Ok(status_text(&lock(node))),
        Cmd::Sync => {
            let net = ctx.net().await?;
            let round = net.sync_all().await?;
            let mut out = format!(
                "sync: {} directory changes, {} sessions ok, {} failed\n",
                round.directory_changes, round.sessions_ok, round.sessions_failed
            );
            for e in &round.errors {
                out.push_str(&format!("  {e}\n"));
            }
            Ok(out)
        }
        Cmd::Export { folder, format, output } => {
            let n = lock(node);
            let folder = n.folder(&folder)?;
            let (text, len) = folder_document(&n, &folder, format)?;
            match output {
                Some(path) => {
                    std::fs::write(&path, &text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
                    Ok(format!("wrote {len} items to {}\n", path.display()))
                }
                None => Ok(text),
            }
        }
        Cmd::News { format } => Ok(news_document(&lock(node), format)?.0),
        Cmd::Import { folder, file, bytes } => {
            let bytes = match bytes {
                Some(b) => b,
                None => std::fs::read(&file).map_err(|e| anyhow!("{}: {e}", file.display()))?,
            };
            let feed = read_feed(&bytes).map_err(|e| anyhow!("{}: {e}", file.display()))?;
            let mut n = lock(node);
            let folder = n.folder(&folder)?;
            let (mut merged, mut rewritten) = (0, 0);
            // A feed written by `export` (or a relay) has entries stamped for readers.
            let items: Vec<Arc<engine::feedsync::Item>> =
                feed.items().map(|i| Arc::new(transport::syndication::restore(i))).collect();
            let results = n.import(&folder, &items)?;
            for (item, ok) in items.iter().zip(results) {
                if ok {
                    merged += 1;
                    continue;
                }
                // Not verifiable here: write its winner again as this device's change.
                let edit = Edit {
                    content: Some(item.version.content.clone()),
                    delete: item.version.deleted,
                    resolve: false,
                };
                n.write(&folder, item.id().as_str(), edit)?;
                rewritten += 1;
            }
            drop(n);
            ctx.changed();
            Ok(format!("imported {} items: {merged} merged as signed, {rewritten} written as this device's changes\n", merged + rewritten))
        }
    }
}

async fn folder_cmd(ctx: &Ctx, command: FolderCmd) -> anyhow::Result<String> {
    let node = &ctx.node;
    if let FolderCmd::Scan { folder } = &command {
        let (folder, data_dir) = {
            let n = lock(node);
            (n.folder(folder)?, n.dir_path.clone())
        };
        let mappings = crate::folders::Mappings::load(&data_dir)?;
        let dir = mappings
            .dir_of(&folder)
            .ok_or_else(|| anyhow!("the folder is not mapped to a directory here (`folder map NAME DIR`)"))?
            .to_path_buf();
        let shared = node.clone();
        let (scan_dir, first) = (dir.clone(), folder);
        let mut pass =
            tokio::task::spawn_blocking(move || crate::folders::pass(&shared, &first, &scan_dir)).await??;
        if !pass.wants.is_empty() {
            // Fetch what it waits for from the folder's other devices, then place it.
            let net = ctx.net().await?;
            if net
                .fetch_waiting(folder, dir.clone(), std::mem::take(&mut pass.wants), Duration::from_secs(30))
                .await
                > 0
            {
                let (shared, fetched) = (node.clone(), pass);
                let mut again =
                    tokio::task::spawn_blocking(move || crate::folders::pass(&shared, &folder, &dir))
                        .await??;
                again.published += fetched.published;
                again.deleted += fetched.deleted;
                again.resolved += fetched.resolved;
                again.written += fetched.written;
                again.removed += fetched.removed;
                pass = again;
            }
        }
        ctx.changed();
        return Ok(pass.summary());
    }
    let mut n = lock(node);
    let out = match command {
        FolderCmd::Create { name, p2p } => {
            if n.user().is_none() {
                bail!("this device is not active in a user yet");
            }
            let change = n.make(Op::CreateFolder { name: name.clone() })?;
            let folder = change.folder_id();
            if p2p {
                n.make(Op::SetStorage { folder, storage: engine::directory::Storage::P2p })?;
            }
            n.make(Op::Map { folder })?;
            // The folder's first content key, with the folder (the daemon shares it with the
            // readers who join later).
            if let Ok(Some(op)) =
                engine::folder::key_op(n.dir().state(), &folder, &n.key, crate::state::random32)
            {
                n.make(op)?;
            }
            // The id stays the last word (scripts take it from there).
            let kind = if p2p { "p2p" } else { "cloud" };
            format!("created {kind} folder {name} {}\n", hex(&folder.0))
        }
        FolderCmd::Storage { folder, storage } => {
            let folder = n.folder(&folder)?;
            let storage = match storage.as_str() {
                "p2p" => engine::directory::Storage::P2p,
                _ => engine::directory::Storage::Cloud,
            };
            n.make(Op::SetStorage { folder, storage })?;
            match storage {
                engine::directory::Storage::P2p => {
                    "content now stays between devices; the cloud drops what it kept at its next sweep\n"
                        .to_string()
                }
                engine::directory::Storage::Cloud => {
                    "content is now also kept at the cloud, sealed, within the owner's quota\n".to_string()
                }
            }
        }
        FolderCmd::Ls => {
            let me = n.user();
            let st = n.dir().state();
            let mut out = String::new();
            for (id, f) in &st.folders {
                let Some(u) = me else { break };
                let invited = st
                    .invitations
                    .values()
                    .any(|i| i.folder == *id && i.invitee == u && i.state == InviteState::Open);
                if !st.is_participant(f, &u) && !invited {
                    continue;
                }
                let mapped = if f.mapped.contains(&n.id) { "mapped" } else { "not mapped" };
                let role = if f.owner == u {
                    "owner".to_string()
                } else if invited {
                    "invited".to_string()
                } else {
                    format!("{:?}", f.members.get(&u).map(|m| m.role).unwrap_or(Role::Member)).to_lowercase()
                };
                let items = n.replica(id).map_or(0, |r| r.items().filter(|i| !i.version.deleted).count());
                let storage = match f.storage {
                    engine::directory::Storage::Cloud => "cloud",
                    engine::directory::Storage::P2p => "p2p",
                };
                let key = match engine::folder::ring_of(st, id, &n.key).current() {
                    Some(k) => format!("content key {}", k.epoch),
                    None => "no content key yet".to_string(),
                };
                out.push_str(&format!(
                    "{} {}\t{role}, {mapped}, {items} items, {storage}, {key}\n",
                    hex(&id.0),
                    f.name
                ));
            }
            out
        }
        FolderCmd::Share { folder, user, admin } => {
            let folder = n.folder(&folder)?;
            let invitee = n.find_user(&user)?;
            let role = if admin { Role::Admin } else { Role::Member };
            let change = n.make(Op::Invite { folder, invitee, role })?;
            format!("invited {user}: invitation {}\n", hex(&change.invite_id().0))
        }
        FolderCmd::Accept { invitation } => {
            let invitation = find_invitation(&n, &invitation)?;
            let folder = n
                .dir()
                .invitation(&invitation)
                .map(|i| i.folder)
                .ok_or_else(|| anyhow!("no such invitation"))?;
            n.make(Op::Accept { invitation })?;
            n.make(Op::Map { folder })?;
            format!("accepted; folder {} is mapped here\n", hex(&folder.0))
        }
        FolderCmd::Decline { invitation } => {
            let invitation = find_invitation(&n, &invitation)?;
            n.make(Op::Decline { invitation })?;
            "declined\n".to_string()
        }
        FolderCmd::Map { folder, path: dir } => {
            let folder = n.folder(&folder)?;
            if n.check_mapped(&folder).is_err() {
                n.make(Op::Map { folder })?;
            }
            match dir {
                Some(dir) => {
                    let dir = crate::folders::map(&n.dir_path, &folder, &dir)?;
                    format!("mapped to {}; its files are published by the next scan (`folder scan`, or the daemon's round)\n", dir.display())
                }
                None => "mapped\n".to_string(),
            }
        }
        FolderCmd::Scan { .. } => bail!("a scan runs without the lock (handled above)"),
        FolderCmd::Unmap { folder, device } => {
            let folder = n.folder(&folder)?;
            let device = match device {
                Some(d) => n.find_device(&d)?,
                None => n.id,
            };
            n.make(Op::Unmap { folder, device })?;
            if device == n.id {
                if let Some(dir) = crate::folders::unmap(&n.dir_path, &folder)? {
                    format!("unmapped; the files in {} stay where they are\n", dir.display())
                } else {
                    "unmapped\n".to_string()
                }
            } else {
                "unmapped\n".to_string()
            }
        }
        FolderCmd::Members { folder } => {
            let folder = n.folder(&folder)?;
            let st = n.dir().state();
            let f = st.folders.get(&folder).ok_or_else(|| anyhow!("no such folder"))?;
            let name =
                |u: &engine::directory::UserId| st.users.get(u).map(|x| x.name.clone()).unwrap_or_default();
            let mut out = format!("{} {} owner\n", short(&f.owner.0), name(&f.owner));
            for (u, m) in &f.members {
                let state = match m.state {
                    MemberState::Pending => "pending",
                    MemberState::Active => "active",
                    MemberState::Removed => "removed",
                };
                out.push_str(&format!(
                    "{} {} {} {state}\n",
                    short(&u.0),
                    name(u),
                    format!("{:?}", m.role).to_lowercase()
                ));
            }
            out
        }
    };
    drop(n);
    ctx.changed();
    Ok(out)
}

/// `status` as text.
pub fn status_text(n: &crate::state::Node) -> String {
    let mut out = format!(
        "device {}\ncloud: {} ({})\n",
        short(&n.id.0),
        if n.cloud_online { "online" } else { "offline" },
        n.cloud_why
    );
    if let Some(t) = n.ticket() {
        let left = (t.body.expires_us as i64 - transport::now_us() as i64) / 1_000_000;
        out.push_str(&format!("ticket: {} folders, expires in {left} s\n", t.body.rights.folders.len()));
    }
    out.push_str("folders:\n");
    for folder in n.dir().folders_of(&n.id) {
        let name = n.dir().folder(&folder).map(|f| f.name.clone()).unwrap_or_default();
        let items = n.replica(&folder).map_or(0, |r| r.len());
        out.push_str(&format!(
            "  {name} {}: {items} items, {} changes not yet acknowledged by the cloud\n",
            short(&folder.0),
            n.pending(&folder)
        ));
    }
    if let Ok(mappings) = crate::folders::Mappings::load(&n.dir_path) {
        if !mappings.folders.is_empty() {
            out.push_str(&format!("content: {} chunk groups fetched since start\n", n.groups_fetched));
        }
        for (folder, dir) in &mappings.folders {
            let id = crate::state::parse_folder_hex(folder);
            let name = id
                .and_then(|f| n.dir().folder(&f).map(|f| f.name.clone()))
                .unwrap_or_else(|| folder[..8].to_string());
            out.push_str(&format!("  {name} is mapped to {}\n", dir.display()));
            let needs = id.and_then(|f| n.needs.get(&f)).map(Vec::as_slice).unwrap_or_default();
            if !needs.is_empty() {
                let (have, size) = needs.iter().fold((0, 0), |(h, s), f| (h + f.have_bytes, s + f.size));
                out.push_str(&format!(
                    "    {} files still needed here ({:.1} of {:.1} MiB):\n",
                    needs.len(),
                    have as f64 / f64::from(1u32 << 20),
                    size as f64 / f64::from(1u32 << 20)
                ));
                for need in needs {
                    out.push_str(&format!("    {}\n", need.line()));
                }
            }
            if let Some(line) = id.and_then(|f| cloud_line(n, &f)) {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    if !n.last_errors.is_empty() {
        out.push_str("last round's errors:\n");
        for e in &n.last_errors {
            out.push_str(&format!("  {e}\n"));
        }
    }
    out.push_str("peers:\n");
    if n.peers.is_empty() {
        out.push_str("  none reached yet\n");
    }
    for p in n.peers.values() {
        out.push_str(&format!(
            "  {} {}: {}; last sync {} ({})\n",
            peer_name(n, &p.device),
            if p.path.is_empty() { "incoming" } else { &p.path },
            if p.why.is_empty() { "they connected to us" } else { &p.why },
            p.last_sync_unix
                .map(|t| format!("{} s ago", transport::now_secs() - t))
                .unwrap_or_else(|| "never".into()),
            p.last_outcome
        ));
    }
    out
}

/// A peer as people know it: its user's name and which of the user's devices it is (devices
/// have no names of their own in the directory), with the start of its id.
fn peer_name(n: &crate::state::Node, device_hex: &str) -> String {
    let short_id = &device_hex[..16.min(device_hex.len())];
    let Some(device) = crate::state::parse_device_hex(device_hex) else { return short_id.to_string() };
    let st = n.dir().state();
    let Some(u) = st.device_user.get(&device).and_then(|id| st.users.get(id)) else {
        return format!("unknown device {short_id}");
    };
    let index = u.devices.keys().position(|d| *d == device).map_or(0, |i| i + 1);
    format!("{}'s device {index} ({short_id})", u.name)
}

/// How a folder's content stands at the cloud, in a line of `status`.
fn cloud_line(n: &crate::state::Node, folder: &engine::directory::FolderId) -> Option<String> {
    let f = n.dir().folder(folder)?;
    let mb = |b: u64| b as f64 / 1e6;
    Some(match (f.storage, n.cloud_content.get(folder)) {
        (engine::directory::Storage::P2p, _) => {
            "content: between devices only (p2p folder; the cloud keeps the metadata)".to_string()
        }
        (_, None) => "content at the cloud: not checked yet".to_string(),
        (_, Some(c)) if c.over_quota => format!(
            "content at the cloud: OVER QUOTA ({:.1} of {:.1} MB used): new content goes peer to peer only",
            mb(c.used),
            mb(c.quota)
        ),
        (_, Some(c)) => {
            let mut line = format!(
                "content at the cloud: {} of {} files stored, sealed; owner's quota {:.1} of {:.1} MB used",
                c.stored_files,
                c.files,
                mb(c.used),
                mb(c.quota)
            );
            if let Some(why) = &c.waiting {
                line.push_str(&format!(" ({why})"));
            }
            line
        }
    })
}

/// `status` as JSON (local API).
pub fn status_json(n: &crate::state::Node) -> serde_json::Value {
    let folders: Vec<_> = n
        .dir()
        .folders_of(&n.id)
        .into_iter()
        .map(|f| {
            serde_json::json!({
                "id": hex(&f.0),
                "name": n.dir().folder(&f).map(|x| x.name.clone()),
                "items": n.replica(&f).map_or(0, |r| r.len()),
                "pending": n.pending(&f),
                "needed": n.needs.get(&f).cloned().unwrap_or_default(),
                "storage": n.dir().folder(&f).map(|x| match x.storage {
                    engine::directory::Storage::Cloud => "cloud",
                    engine::directory::Storage::P2p => "p2p",
                }),
                "cloud_content": n.cloud_content.get(&f),
            })
        })
        .collect();
    serde_json::json!({
        "device": hex(&n.id.0),
        "cloud": { "online": n.cloud_online, "why": n.cloud_why },
        "folders": folders,
        "peers": n.peers.values().collect::<Vec<_>>(),
        "groups_fetched": n.groups_fetched,
    })
}

/// `pair` on a new device: asks the cloud, waits for an existing device, shows the code, and
/// waits until the directory has this device.
pub async fn pair(
    ctx: &Ctx,
    account: &str,
    password: &str,
    wait: Duration,
    mut show: impl FnMut(&str),
) -> anyhow::Result<String> {
    let net = ctx.net().await?;
    if lock(&ctx.node).user().is_some() {
        bail!("this device already belongs to a user");
    }
    let (id, nonce_new) = net::pair_request(&net, account, password).await?;
    show("waiting for an existing device of this user to answer (is one running `feedmesh run`?)...");
    let deadline = tokio::time::Instant::now() + wait;
    let (existing, nonce_existing, user) = loop {
        if let Response::PairStatus(p) = net.request(Request::PairStatus { id }).await? {
            if let Some((existing, nonce)) = p.existing {
                break (existing, nonce, p.user);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no existing device answered within {} s", wait.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let me_key = lock(&ctx.node).key.clone();
    let me = engine::signing::DeviceId::of(&me_key);
    let code = engine::directory::short_code(&existing, &me, &nonce_existing, &nonce_new);
    let pairing =
        engine::directory::pair_new_device(&me_key, user, existing, nonce_existing, nonce_new, code)
            .map_err(|e| anyhow!("{e}"))?;
    net.request(Request::PairConsent { id, pairing }).await?;
    show(&format!(
        "pairing code: {code:06}\nconfirm it on an existing device with: feedmesh device approve {code:06}"
    ));
    loop {
        net.sync_directory().await?;
        if lock(&ctx.node).user().is_some() {
            return Ok(format!("paired: this device now belongs to user {}\n", hex(&user.0)));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the pairing was not approved within {} s", wait.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

//! `feedmesh feedsync ...`: the FeedSync command-line contract (see README.md and
//! docs/feedsync-profile.md). Output goes to stdout; nothing is written to the input files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use engine::feedsync::{self, limits, xml, Edit, Endpoint, Feed, ItemId, When};

#[derive(Subcommand, Debug)]
pub enum FeedsyncCommand {
    /// Merge INCOMING into LOCAL (FeedSync 3.3); the merged feed, in LOCAL's dialect, on stdout.
    Merge {
        /// The local feed (the result keeps its dialect).
        local: PathBuf,
        /// The incoming feed, merged into it.
        incoming: PathBuf,
    },
    /// Create or update one item (FeedSync 3.1/3.2, delete, resolve 3.4); the feed on stdout.
    Update {
        /// The feed to change.
        feed: PathBuf,
        /// The item's sync id (RFC 2141 NSS characters).
        #[arg(long, value_parser = parse_id)]
        id: ItemId,
        /// The endpoint making the change.
        #[arg(long, value_parser = parse_by)]
        by: Endpoint,
        /// When the change is made (RFC 3339; written in whole seconds, UTC). Default: now.
        #[arg(long, value_parser = parse_when)]
        when: Option<When>,
        /// Set the item's title.
        #[arg(long)]
        title: Option<String>,
        /// Make the item a tombstone.
        #[arg(long)]
        delete: bool,
        /// Resolve all of the item's conflicts.
        #[arg(long)]
        resolve: bool,
    },
    /// Sparse purge of every item's history; the feed on stdout.
    Purge {
        /// The feed to purge.
        feed: PathBuf,
    },
    /// Check a feed: prints `ok`, or one `FILE:LINE: problem` line per problem (exit 1).
    Validate {
        /// The feed to check.
        feed: PathBuf,
    },
}

fn parse_id(text: &str) -> Result<ItemId, String> {
    ItemId::new(text).map_err(|e| e.to_string())
}

fn parse_by(text: &str) -> Result<Endpoint, String> {
    Endpoint::new(text).map_err(|e| e.to_string())
}

fn parse_when(text: &str) -> Result<When, String> {
    When::parse(text).map(|w| w.whole_seconds()).map_err(|e| e.to_string())
}

/// A failure that exits with status 1 and one line on stderr.
struct Failure(String);

pub fn run(command: FeedsyncCommand) -> ExitCode {
    let result = match command {
        FeedsyncCommand::Merge { local, incoming } => merge(&local, &incoming),
        FeedsyncCommand::Update { feed, id, by, when, title, delete, resolve } => {
            update(&feed, &id, &by, when, title.as_deref(), delete, resolve)
        }
        FeedsyncCommand::Purge { feed } => purge(&feed),
        FeedsyncCommand::Validate { feed } => return validate(&feed),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message)) => {
            eprintln!("feedmesh: {}", message.replace('\n', " "));
            ExitCode::from(1)
        }
    }
}

/// Reads a file of at most the feed size limit.
fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limits::FEED_BYTES_MAX as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(bytes)
}

fn load(path: &Path) -> Result<Feed, Failure> {
    let name = path.display();
    let bytes = read_bytes(path).map_err(|e| Failure(format!("{name}: {e}")))?;
    xml::read_feed(&bytes).map_err(|err| {
        let first = &err.problems[0];
        let more = match err.problems.len() {
            1 => String::new(),
            n => format!(" (and {} more problems)", n - 1),
        };
        Failure(format!("{name}:{}: {}{more}", first.line, first.kind))
    })
}

fn emit(feed: &Feed) -> Result<(), Failure> {
    let text = xml::write_feed(feed);
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure(format!("cannot write to stdout: {e}")))
}

fn merge(local: &Path, incoming: &Path) -> Result<(), Failure> {
    let mut feed = load(local)?;
    let other = load(incoming)?;
    feedsync::merge_feed(&mut feed, &other)
        .map_err(|e| Failure(format!("{}: {e} ({})", incoming.display(), local.display())))?;
    emit(&feed)
}

fn update(
    path: &Path,
    id: &ItemId,
    by: &Endpoint,
    when: Option<When>,
    title: Option<&str>,
    delete: bool,
    resolve: bool,
) -> Result<(), Failure> {
    let mut feed = load(path)?;
    let when = match when {
        Some(when) => when,
        None => now().map_err(|e| Failure(format!("{}: {e}", path.display())))?,
    };
    let base = match feed.item(id) {
        Some(item) => (*item.version.content).clone(),
        None => feedsync::Content { attrs: "".into(), inner: "".into(), scope: feed.envelope.scope.clone() },
    };
    let base = match title {
        Some(title) => (*xml::set_title(&base, &feed.envelope, title)).clone(),
        None => base,
    };
    let content = xml::stamp_atom_entry(&base, &feed.envelope, feed.dialect, id, &when);
    let edit = Edit { content: Some(content), delete, resolve };
    feed.change(id, by, &when, &edit).map_err(|e| Failure(format!("{}: {e}", path.display())))?;
    emit(&feed)
}

fn now() -> Result<When, String> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "the system clock is before 1970".to_string())?
        .as_secs();
    When::from_unix_secs(i64::try_from(secs).unwrap_or(i64::MAX)).map_err(|e| e.to_string())
}

fn purge(path: &Path) -> Result<(), Failure> {
    let mut feed = load(path)?;
    feed.purge();
    emit(&feed)
}

fn validate(path: &Path) -> ExitCode {
    let name = path.display();
    let bytes = match read_bytes(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            println!("{name}:1: {e}");
            return ExitCode::from(1);
        }
    };
    match xml::read_feed(&bytes) {
        Ok(_) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(err) => {
            for problem in &err.problems {
                println!("{name}:{}: {}", problem.line, problem.kind);
            }
            ExitCode::from(1)
        }
    }
}

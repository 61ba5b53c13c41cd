//! `feedmesh`: the device binary. See `feedmesh --help`; README.md walks through a relay and
//! two nodes.
//!
//! Exit status: 0 success; 1 failure (one line on stderr); 2 usage errors (clap's own).

mod feedsync_cli;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use node::api::ApiFile;
use node::cmd::{exec, Cmd, Ctx};
use node::state::{self, Node, NodeConfig};

#[derive(Parser, Debug)]
#[command(
    name = "feedmesh",
    version,
    about = "feedmesh device: folders of FeedSync items, synced over a mesh"
)]
struct Cli {
    /// Data directory (default: $FEEDMESH_DIR, else ~/.feedmesh).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    /// Set up this device: a key and a data directory, tied to a relay. With --name, this is a
    /// user's first device and creates the user; otherwise `pair` it into a user.
    Init {
        /// The relay's HTTP API, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        relay: String,
        /// Create a user with this name (first device).
        #[arg(long)]
        name: Option<String>,
        /// Also set up a cloud account with this name (password from $FEEDMESH_PASSWORD or stdin).
        #[arg(long, requires = "name")]
        account: Option<String>,
        /// A CA certificate (PEM file) to trust for the relay's HTTPS, e.g. its self-signed one.
        #[arg(long)]
        relay_ca: Option<PathBuf>,
    },
    /// Add this device to a user's mesh: shows a short code to confirm on an existing device
    /// (`feedmesh device approve CODE`). Password from $FEEDMESH_PASSWORD or stdin.
    Pair {
        /// The user's cloud account.
        #[arg(long)]
        account: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// The daemon: stays connected to the relay, syncs with the cloud and with peers (direct
    /// when possible, relayed otherwise), and serves the local API.
    Run {
        /// Local API address (127.0.0.1 only; port 0 picks one; see api.json).
        #[arg(long, default_value = "127.0.0.1:0")]
        api: std::net::SocketAddr,
        /// Seconds between sync rounds (changes and notices also start one).
        #[arg(long, default_value_t = 10)]
        interval: u64,
        /// UDP address for the device endpoint (default: any).
        #[arg(long)]
        bind: Option<std::net::SocketAddr>,
        /// Sync with the cloud only, never directly with peers.
        #[arg(long)]
        cloud_only: bool,
        /// Use no UDP: every packet goes through the relay.
        #[arg(long)]
        relay_only: bool,
    },
    /// Read, merge, change and check FeedSync feeds (RSS 2.0 or Atom) as files.
    Feedsync {
        #[command(subcommand)]
        command: feedsync_cli::FeedsyncCommand,
    },
    #[command(flatten)]
    Cmd(Cmd),
}

fn password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("FEEDMESH_PASSWORD") {
        return Ok(p);
    }
    eprint!("password: ");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FEEDMESH_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,iroh=off,iroh_relay=off,noq=off,noq_proto=off")
    });
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

/// A daemon status line on stdout. The daemon outlives whoever reads its stdout (a terminal
/// closed, a supervisor that stopped reading): a write that fails is dropped, where `println!`
/// would panic and skip the clean stop (and the save of what sessions merged).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // reqwest (init, the local API client) uses rustls with the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Top::Feedsync { command } = cli.command {
        return feedsync_cli::run(command);
    }
    let dir = node::data_dir(cli.dir);
    match run(&dir, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("feedmesh: {}", transport::view::terminal_text(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// How long `init` waits for a relay that refuses connections (just started, or not yet).
const RELAY_WAIT: Duration = Duration::from_secs(15);

fn shared(node: Node) -> Arc<Mutex<Node>> {
    Arc::new(Mutex::new(node))
}

fn run(dir: &Path, top: Top) -> anyhow::Result<()> {
    match top {
        Top::Feedsync { .. } => unreachable!("handled in main"),
        Top::Init { relay, name, account, relay_ca } => {
            // What can be checked here is checked before anything is created.
            if let Some(name) = &name {
                check_user_name(name)?;
            }
            let password = match &account {
                Some(account) => {
                    check_account_name(account)?;
                    let p = password()?;
                    if !(8..=1024).contains(&p.len()) {
                        bail!("passwords are 8 to 1024 bytes (nothing was created)");
                    }
                    Some(p)
                }
                None => None,
            };
            if dir.join(state::KEY_FILE).exists() {
                bail!("{} is already initialised (it has {})", dir.display(), state::KEY_FILE);
            }
            let relay_ca_pem = match relay_ca {
                Some(p) => {
                    Some(std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?)
                }
                None => None,
            };
            let rt = runtime()?;
            let base = relay.trim_end_matches('/').to_string();
            let info: relay_info::ConnectInfo = rt.block_on(async {
                let url = format!("{base}/v1/connect");
                // A relay started a moment ago may not listen yet: wait a little for it, saying so.
                let deadline = tokio::time::Instant::now() + RELAY_WAIT;
                let mut said = false;
                let resp = loop {
                    match reqwest::get(&url).await {
                        Err(e) if e.is_connect() && tokio::time::Instant::now() < deadline => {
                            if !said {
                                eprintln!(
                                    "waiting for the relay at {url} (not accepting connections yet)..."
                                );
                                said = true;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => break other.with_context(|| format!("reaching the relay at {url}"))?,
                    }
                };
                if !resp.status().is_success() {
                    bail!("{url}: HTTP {}", resp.status());
                }
                let info = resp.json().await.with_context(|| format!("{url}: not a feedmesh relay"))?;
                // Names taken on this relay: refused here, before anything is created.
                for (kind, value) in [("user", &name), ("account", &account)] {
                    let Some(value) = value else { continue };
                    let mut url = reqwest::Url::parse(&base).with_context(|| format!("relay URL {base:?}"))?;
                    url.path_segments_mut()
                        .map_err(|_| anyhow!("relay URL {base:?} cannot take a path"))?
                        .extend(["v1", "names", value.as_str()]);
                    let names: serde_json::Value = reqwest::get(url.clone())
                        .await
                        .with_context(|| format!("reaching {url}"))?
                        .json()
                        .await
                        .with_context(|| format!("{url}: not a feedmesh relay"))?;
                    if names[format!("{kind}_taken")] == serde_json::Value::Bool(true) {
                        bail!("the cloud refused: the {kind} name {value:?} is taken on this relay (nothing was created; choose another)");
                    }
                }
                anyhow::Ok(info)
            })?;
            let cloud = node::state::parse_device_hex(&info.cloud)
                .ok_or_else(|| anyhow!("the relay sent a bad cloud id"))?;
            let cfg = NodeConfig {
                cloud,
                relay_url: info.relay_url.clone(),
                cloud_addrs: info.addrs.clone(),
                relay_ca_pem,
                relay_qad_port: info.qad_port,
            };
            let created_dir = !dir.exists();
            state::create(dir, &cfg)?;
            let node = Node::open(dir)?;
            let id = node.id;
            let node = shared(node);
            if let Some(name) = name {
                node::net::lock(&node).make(engine::directory::Op::CreateUser { name: name.clone() })?;
                let ctx = Ctx::new(node.clone(), None);
                let pushed = rt.block_on(async {
                    let net = ctx.net().await?;
                    let pushed = net.sync_directory().await.map(|_| ());
                    ctx.close().await;
                    pushed
                });
                drop(ctx);
                match pushed {
                    Err(e) if refused(&e).is_some() => {
                        // The cloud will not have this user: leave nothing behind, so that
                        // `init` can simply run again.
                        drop(node);
                        undo_init(dir, created_dir);
                        let hint = match refused(&e) {
                            Some(transport::ControlError::Directory(_)) => {
                                format!(" (is the user name {name:?} taken?)")
                            }
                            _ => String::new(),
                        };
                        bail!("the cloud refused: {e:#}{hint}; nothing was kept in {}", dir.display());
                    }
                    Err(e) => {
                        println!("created user {name} with this device as its first device");
                        println!("(the cloud was not reached: {e:#}; the user syncs when it is)");
                        if account.is_some() {
                            bail!("the cloud account was not set up: run `feedmesh account NAME` once the relay is reachable");
                        }
                    }
                    Ok(()) => {
                        println!("created user {name} with this device as its first device");
                        if let (Some(account), Some(password)) = (account, password) {
                            let ctx = Ctx::new(node.clone(), None);
                            let done = rt.block_on(async {
                                let out = exec(
                                    &ctx,
                                    Cmd::Account { name: account.clone(), password: Some(password) },
                                )
                                .await;
                                ctx.close().await;
                                out
                            });
                            match done {
                                Ok(_) => println!("cloud account {account} set up"),
                                Err(e) if refused(&e).is_some() => bail!(
                                    "the cloud refused the account {account:?}: {e:#}; user {name} and this device are set up in {}: choose another account name with `feedmesh account NAME`",
                                    dir.display()
                                ),
                                Err(e) => bail!(
                                    "the cloud account was not set up ({e:#}); user {name} and this device are set up in {}: retry with `feedmesh account {account}`",
                                    dir.display()
                                ),
                            }
                        }
                    }
                }
            }
            println!("device {} initialised in {}", engine::signing::hex(&id.0), dir.display());
            println!("relay {} (cloud {})", info.relay_url, &info.cloud[..16]);
            Ok(())
        }
        Top::Pair { account, timeout } => {
            let password = password()?;
            let node = shared(Node::open(dir)?);
            let ctx = Ctx::new(node, None);
            let out = runtime()?.block_on(async {
                let out = node::cmd::pair(&ctx, &account, &password, Duration::from_secs(timeout), |m| {
                    println!("{m}")
                })
                .await;
                ctx.close().await;
                out
            })?;
            print!("{}", transport::view::terminal_text(&out));
            Ok(())
        }
        Top::Run { api, interval, bind, cloud_only, relay_only } => {
            if !api.ip().is_loopback() {
                bail!("the local API listens on loopback only");
            }
            // One daemon per data directory: a second one stops here at once (a short CLI
            // command may still hold the database for a moment: that is waited for below).
            let _daemon_lock = node::lock_daemon(dir)?;
            let node = shared(open_waiting(dir)?);
            let rt = runtime()?;
            rt.block_on(async move {
                // The local API first (so CLI commands find api.json at once), then the network.
                let ctx = Arc::new(Ctx::with_options(node.clone(), bind, relay_only));
                let listener =
                    tokio::net::TcpListener::bind(api).await.with_context(|| format!("binding {api}"))?;
                let mut token = [0u8; 32];
                rand::fill(&mut token);
                let token = engine::signing::hex(&token);
                let file =
                    ApiFile { addr: listener.local_addr()?, token: token.clone(), pid: std::process::id() };
                tokio::spawn(node::api::serve(ctx.clone(), listener, token));
                state::write_private(&dir.join(state::API_FILE), serde_json::to_string(&file)?.as_bytes())?;
                let net = ctx.net().await?;
                net.peer_sync.store(!cloud_only, std::sync::atomic::Ordering::Relaxed);
                say!("feedmesh device {} running", &engine::signing::hex(&node::net::lock(&node).id.0)[..16]);
                say!("local API on http://{} (token in {})", file.addr, dir.join(state::API_FILE).display());
                tokio::spawn(net.clone().run(Duration::from_secs(interval.max(1))));
                let signal = transport::shutdown_signal().await;
                // Writes are committed before they are acknowledged; what sessions merged is
                // saved as they end. Stopping: no new commands, then leave the mesh.
                say!("feedmesh: {signal}: stopping");
                let _ = std::fs::remove_file(dir.join(state::API_FILE));
                net.disconnect().await;
                net.endpoint.close().await;
                // What sessions cut short had merged (a crash would lose only that).
                if let Err(e) = node::net::lock(&node).sync_store() {
                    eprintln!("feedmesh: saving merged items: {e:#}");
                }
                say!("feedmesh: stopped");
                anyhow::Ok(())
            })
        }
        Top::Cmd(Cmd::Status { watch: true }) => watch_status(dir),
        Top::Cmd(cmd) => {
            let cmd = fill(cmd)?;
            match Node::open(dir) {
                Ok(node) => run_here(node, cmd),
                Err(e) if node::is_locked(&e) => via_daemon(dir, cmd),
                Err(e) => Err(e),
            }
        }
    }
}

/// The cloud's typed refusal inside an error, if it is one.
fn refused(e: &anyhow::Error) -> Option<transport::ControlError> {
    e.chain().find_map(|c| c.downcast_ref::<transport::CloudRefused>()).map(|r| r.0)
}

/// Removes what a refused `init` made: the directory if it made it, else its files.
fn undo_init(dir: &Path, created_dir: bool) {
    if created_dir {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        for file in [state::KEY_FILE, state::DB_FILE] {
            let _ = std::fs::remove_file(dir.join(file));
        }
    }
}

/// A user name as the directory takes it (checked again there): 1 to 256 bytes, no control
/// characters.
fn check_user_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        bail!("user names are 1 to 256 bytes without control characters (nothing was created)");
    }
    Ok(())
}

/// An account name as the relay takes it: 1 to 64 of a-z, 0-9, '.', '_' and '-'.
fn check_account_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !ok {
        bail!("account names are 1 to 64 characters of a-z, 0-9, '.', '_' and '-' (nothing was created)");
    }
    Ok(())
}

/// Opens the node, waiting up to 30 s while another process holds the database.
fn open_waiting(dir: &Path) -> anyhow::Result<Node> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match Node::open(dir) {
            Err(e) if node::is_locked(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Reads what a command needs from the terminal or files before it may travel to the daemon.
fn fill(cmd: Cmd) -> anyhow::Result<Cmd> {
    Ok(match cmd {
        Cmd::Account { name, password: None } => Cmd::Account { name, password: Some(password()?) },
        Cmd::Import { folder, file, bytes: None } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            Cmd::Import { folder, file, bytes: Some(bytes) }
        }
        Cmd::Put { folder, id, text: None, title, file: Some(f) } => {
            let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            state::check_text(&text)?;
            Cmd::Put { folder, id, text: Some(text), title, file: None }
        }
        // Checked before it travels to a daemon: the same error either way.
        Cmd::Put { folder, id, text: Some(text), title, file } => {
            state::check_text(&text)?;
            Cmd::Put { folder, id, text: Some(text), title, file }
        }
        other => other,
    })
}

/// Runs a command in this process (no daemon holds the database) and prints its output.
fn run_here(node: Node, cmd: Cmd) -> anyhow::Result<()> {
    let ctx = Ctx::new(shared(node), None);
    let out = runtime()?.block_on(async {
        let out = exec(&ctx, cmd).await;
        ctx.close().await;
        out
    })?;
    print!("{}", transport::view::terminal_text(&out));
    Ok(())
}

/// `status --watch`: polls the daemon's `/v1/status` and draws a progress bar per file still
/// needed (indicatif; plain lines when stderr is not a terminal), with its sources and rate or
/// why it waits, until nothing is needed.
fn watch_status(dir: &Path) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    let path = dir.join(state::API_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("status --watch follows a running daemon ({} is missing)", path.display())
    })?;
    let file: ApiFile =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid", path.display()))?;
    let style = ProgressStyle::with_template("{prefix:30!} [{bar:30}] {bytes:>10}/{total_bytes:10} {msg}")
        .map_err(|e| anyhow!("{e}"))?
        .progress_chars("#>.");
    let multi = MultiProgress::new();
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let rt = runtime()?;
    let client = reqwest::Client::new();
    let mut quiet_polls = 0;
    // Bound: until nothing is needed for two polls in a row (or the daemon goes away).
    loop {
        let status: serde_json::Value = rt.block_on(async {
            client
                .get(format!("http://{}/v1/status", file.addr))
                .bearer_auth(&file.token)
                .send()
                .await
                .with_context(|| format!("reaching the daemon at {}", file.addr))?
                .json()
                .await
                .context("the daemon's status")
        })?;
        let mut seen = std::collections::BTreeSet::new();
        for folder in status["folders"].as_array().into_iter().flatten() {
            let name = folder["name"].as_str().unwrap_or("?");
            for need in folder["needed"].as_array().into_iter().flatten() {
                let key = format!("{name}/{}", need["path"].as_str().unwrap_or("?"));
                let bar = bars.entry(key.clone()).or_insert_with(|| {
                    let bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
                    bar.set_prefix(key.clone());
                    bar
                });
                bar.set_length(need["size"].as_u64().unwrap_or(0));
                bar.set_position(need["have_bytes"].as_u64().unwrap_or(0));
                let sources: Vec<String> = need["sources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        format!(
                            "{} ({}, {:.1} MiB/s)",
                            s[0].as_str().unwrap_or("?"),
                            s[1].as_str().unwrap_or("?"),
                            s[2].as_f64().unwrap_or(0.0) / f64::from(1u32 << 20)
                        )
                    })
                    .collect();
                let msg = match need["waiting"].as_str() {
                    Some(why) if sources.is_empty() => format!("waiting: {why}"),
                    _ => format!("from {}", sources.join(", ")),
                };
                bar.set_message(msg);
                if multi.is_hidden() {
                    println!(
                        "{key}: {} of {} bytes, {}",
                        bar.position(),
                        bar.length().unwrap_or(0),
                        bar.message()
                    );
                }
                seen.insert(key);
            }
        }
        let gone: Vec<String> = bars.keys().filter(|k| !seen.contains(*k)).cloned().collect();
        for key in gone {
            if let Some(bar) = bars.remove(&key) {
                if let Some(len) = bar.length() {
                    bar.set_position(len);
                }
                bar.finish_with_message("here");
            }
        }
        quiet_polls = if seen.is_empty() { quiet_polls + 1 } else { 0 };
        if quiet_polls >= 2 {
            println!("nothing is needed: every mapped folder's files are here");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Sends a command to the running daemon's local API.
fn via_daemon(dir: &Path, cmd: Cmd) -> anyhow::Result<()> {
    let path = dir.join(state::API_FILE);
    // A daemon that is starting holds the database before it writes api.json; another command
    // may hold it for a moment. Wait for either to pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        if let Ok(node) = Node::open(dir) {
            return run_here(node, cmd);
        }
    }
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("the database is in use but {} is missing (is a daemon starting?)", path.display())
    })?;
    let file: ApiFile =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid", path.display()))?;
    let out: serde_json::Value = runtime()?.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/exec", file.addr))
            .bearer_auth(&file.token)
            .json(&cmd)
            .send()
            .await
            .with_context(|| format!("reaching the daemon at {}", file.addr))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        if !status.is_success() {
            bail!("{}", body["message"].as_str().or(body["error"].as_str()).unwrap_or("daemon error"));
        }
        anyhow::Ok(body)
    })?;
    print!("{}", transport::view::terminal_text(out["output"].as_str().unwrap_or_default()));
    Ok(())
}

mod relay_info {
    /// `GET /v1/connect` of the relay.
    #[derive(serde::Deserialize, Debug)]
    pub struct ConnectInfo {
        pub cloud: String,
        pub relay_url: String,
        pub addrs: Vec<std::net::SocketAddr>,
        /// Absent from relays older than address discovery.
        #[serde(default)]
        pub qad_port: Option<u16>,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument of every command says what it is (issue 13, item 4).
    #[test]
    fn every_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "feedmesh", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }
}

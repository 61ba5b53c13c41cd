//! `feedmesh-relay`: see the library docs. Settings come from `--config FILE` (TOML), then flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// A status line on stdout. A relay outlives whoever reads its stdout (a terminal closed, a
/// supervisor that stopped reading): a write that fails is dropped, where `println!` would panic
/// and skip the clean stop.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// jemalloc returns freed memory to the system (glibc's malloc kept what connection churn had
/// freed resident: issue 11, defect 9); the library does not choose an allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The feedmesh cloud and relay: directory, tickets, a replica of every feed, an HTTP API and an
/// iroh relay server, in one process.
#[derive(Parser, Debug)]
#[command(name = "feedmesh-relay", version, about, long_about = None)]
struct Args {
    /// TOML config file (flags override it).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Data directory (key and database).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API address.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// iroh relay server address (HTTP; HTTPS with --tls-cert/--tls-key).
    #[arg(long)]
    relay: Option<SocketAddr>,
    /// The cloud endpoint's UDP address.
    #[arg(long)]
    quic: Option<SocketAddr>,
    /// Relay URL to give devices (when reached through a proxy or a public name).
    #[arg(long)]
    public_relay_url: Option<String>,
    /// Public UDP address of the cloud endpoint (repeatable).
    #[arg(long)]
    public_addr: Vec<SocketAddr>,
    /// PEM certificate chain for the relay's HTTPS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the relay's HTTPS.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve the relay over HTTPS with a self-signed certificate for NAME (repeatable; local
    /// use). The certificate is written to DATA_DIR/relay-cert.pem for `feedmesh init --relay-ca`.
    #[arg(long, value_name = "NAME", conflicts_with = "tls_cert")]
    tls_self_signed: Vec<String>,
    /// QUIC address discovery address (UDP; needs TLS). Default: the relay's IP, port 7842.
    #[arg(long)]
    qad: Option<SocketAddr>,
    /// Do not run QUIC address discovery (hole punching then rarely works behind NATs).
    #[arg(long, conflicts_with = "qad")]
    no_qad: bool,
    /// The address discovery port devices are told, when a port forward maps it.
    #[arg(long, value_name = "PORT", conflicts_with = "no_qad")]
    public_qad_port: Option<u16>,
    /// A reverse proxy in front of the HTTP API whose X-Forwarded-For is believed (repeatable).
    #[arg(long, value_name = "IP")]
    trusted_proxy: Vec<std::net::IpAddr>,
    /// Log as JSON lines (default: human-readable).
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("FEEDMESH_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,iroh=warn,iroh_relay=error,noq=warn,noq_proto=error"));
    if args.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let mut cfg = match &args.config {
        Some(path) => match relay::Config::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("feedmesh-relay: {e:#}");
                return ExitCode::from(2);
            }
        },
        None => relay::Config::default(),
    };
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.http {
        cfg.http = v;
    }
    if let Some(v) = args.relay {
        cfg.relay = v;
    }
    if let Some(v) = args.quic {
        cfg.quic = v;
    }
    if args.public_relay_url.is_some() {
        cfg.public_relay_url = args.public_relay_url;
    }
    if !args.public_addr.is_empty() {
        cfg.public_addrs = args.public_addr;
    }
    if !args.tls_self_signed.is_empty() {
        cfg.tls_self_signed = args.tls_self_signed;
    }
    if args.qad.is_some() {
        cfg.qad = args.qad;
    }
    if args.no_qad {
        cfg.no_qad = true;
    }
    if args.public_qad_port.is_some() {
        cfg.public_qad_port = args.public_qad_port;
    }
    if !args.trusted_proxy.is_empty() {
        cfg.trusted_proxies = args.trusted_proxy;
    }
    if args.tls_cert.is_some() {
        cfg.tls_cert = args.tls_cert;
        cfg.tls_key = args.tls_key;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("feedmesh-relay: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match relay::start(cfg).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("feedmesh-relay: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let info = running.connect_info();
        say!("feedmesh-relay is up");
        say!("  HTTP API:   http://{}", running.http_addr);
        say!("  relay:      {}", running.relay_url);
        say!("  cloud id:   {}", info.cloud);
        say!("  cloud UDP:  {}", info.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "));
        match running.qad_addr {
            Some(a) if running.qad_port != Some(a.port()) => say!(
                "  address discovery (QUIC): {a}, devices told port {}",
                running.qad_port.unwrap_or_default()
            ),
            Some(a) => say!("  address discovery (QUIC): {a}"),
            None => {
                say!("  address discovery: off (it needs TLS; hole punching behind NATs will rarely work)")
            }
        }
        say!("  devices join with: feedmesh init --relay http://{}", running.http_addr);
        let signal = transport::shutdown_signal().await;
        // Every change is committed when it is accepted; stopping closes connections, waits for
        // them to let go of the store, and releases the data directory's lock.
        say!("feedmesh-relay: {signal}: stopping");
        running.shutdown().await;
        say!("feedmesh-relay: stopped");
        ExitCode::SUCCESS
    })
}

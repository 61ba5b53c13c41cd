//! `feedmesh-relay`: the cloud and the relay in one process.
//!
//! - an **iroh endpoint** (UDP, keyed by the cloud key) that devices connect to: tickets, the
//!   directory, a replica of every feed, the address book, pairing and change notices
//!   ([`cloud`]);
//! - the **embedded iroh relay server** that forwards encrypted QUIC packets between devices that
//!   cannot reach each other directly (it sees only ciphertext);
//! - an **HTTP API** (axum): REST resources in JSON, feeds as FeedSync Atom, FeedSync POST,
//!   long-poll notifications, health and Prometheus metrics ([`http`]), served on connections
//!   with bounded number, header, body and idle times ([`http::conn`]).
//!
//! Storage is one redb file (`relay.redb` in the data directory, mode 0600) plus the cloud key
//! file.

pub mod cloud;
pub mod http;
pub mod limit;
pub mod login;
pub mod metrics;
pub mod quic;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use engine::signing::DeviceKey;
use serde::{Deserialize, Serialize};

pub use cloud::{Cloud, Limits};

/// Relay settings (a TOML file and/or flags).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the key and the database live.
    pub data_dir: PathBuf,
    /// The HTTP API.
    pub http: SocketAddr,
    /// The embedded iroh relay server (HTTP, or HTTPS with `tls_cert`/`tls_key`).
    pub relay: SocketAddr,
    /// The cloud's iroh endpoint (UDP).
    pub quic: SocketAddr,
    /// The relay URL devices are told to use (default: from `relay`).
    pub public_relay_url: Option<String>,
    /// Addresses to advertise for the cloud endpoint (default: the bound ones).
    pub public_addrs: Vec<SocketAddr>,
    /// PEM certificate chain and key for the relay's HTTPS (deployment).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Serve the relay over HTTPS with a self-signed certificate for these names (local use;
    /// written to `relay-cert.pem` in the data directory, which nodes pass to
    /// `feedmesh init --relay-ca`). Empty: off.
    pub tls_self_signed: Vec<String>,
    /// The admin bearer token (default: generated into `admin.token` in the data directory).
    pub admin_token: Option<String>,
    /// QUIC address discovery (UDP): devices ask it which public address their NAT gave them,
    /// which is what hole punching needs. It speaks TLS, so it runs only when the relay has TLS;
    /// then it defaults to the relay's IP and port 7842. Set to port 0 for any free port.
    pub qad: Option<SocketAddr>,
    /// Never run QUIC address discovery (devices then punch holes only with the addresses they
    /// see on their own interfaces, which fails behind most NATs).
    pub no_qad: bool,
    /// The UDP port devices reach address discovery on, when a port forward or a load balancer
    /// maps it to another one (default: the bound port).
    pub public_qad_port: Option<u16>,
    /// Reverse proxies in front of the HTTP API. A request whose TCP peer is one of them is
    /// limited by the client address the proxies put in `X-Forwarded-For`; from anyone else
    /// that header is ignored (it could be forged). Empty: every request is its TCP peer.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("relay-data"),
            http: "127.0.0.1:8080".parse().expect("literal"),
            relay: "127.0.0.1:3340".parse().expect("literal"),
            quic: "0.0.0.0:4433".parse().expect("literal"),
            public_relay_url: None,
            public_addrs: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_self_signed: Vec::new(),
            admin_token: None,
            qad: None,
            no_qad: false,
            public_qad_port: None,
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// Everything on 127.0.0.1 with ports the system picks (address discovery too), data in
    /// `data_dir`: relays for tests and benchmarks that run side by side.
    pub fn loopback(data_dir: &Path) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal");
        Self {
            data_dir: data_dir.to_path_buf(),
            http: any,
            relay: any,
            quic: any,
            qad: Some(any),
            ..Self::default()
        }
    }

    /// Reads a TOML config file (unknown keys are errors).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Running {
    pub cloud: Arc<Cloud>,
    pub http_addr: SocketAddr,
    pub relay_url: iroh::RelayUrl,
    /// The bound QUIC address discovery address, when it runs.
    pub qad_addr: Option<SocketAddr>,
    /// The address discovery port devices are told (`public_qad_port`, else the bound one).
    pub qad_port: Option<u16>,
    pub endpoint: iroh::Endpoint,
    pub admin_token: String,
    relay_server: Option<iroh_relay::server::Server>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The data directory's lock ([`lock_data_dir`]).
    lock: Option<std::fs::File>,
}

impl Running {
    /// What a node needs to reach this cloud.
    pub fn connect_info(&self) -> http::ConnectInfo {
        http::connect_info(&self.cloud, &self.endpoint, &self.relay_url, self.qad_port)
    }

    /// Stops every task and closes the endpoint, then waits (at most [`SHUTDOWN_WAIT`]) for the
    /// connections' tasks to let go of the cloud, so its store is closed when this returns and
    /// the data directory can be opened again at once (a restart, or the next process).
    pub async fn shutdown(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.endpoint.close().await;
        if let Some(server) = self.relay_server.take() {
            let _ = server.shutdown().await;
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        while Arc::strong_count(&self.cloud) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&self.cloud) > 1 {
            tracing::warn!("connections still held the cloud after {SHUTDOWN_WAIT:?}");
        }
        drop(self.lock.take());
    }
}

/// Longest [`Running::shutdown`] waits for connections to end.
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The lock file that keeps a second relay off a data directory.
pub const LOCK_FILE: &str = "relay.lock";

/// Why a relay could not take its data directory.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another feedmesh-relay is running on {0} (it holds {LOCK_FILE}); stop it first")]
    Held(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Takes the data directory's advisory lock without waiting: held until the returned file is
/// dropped (or the process ends, however it ends).
pub fn lock_data_dir(dir: &Path) -> Result<std::fs::File, LockError> {
    let path = dir.join(LOCK_FILE);
    let io = |source| LockError::Io { path: path.display().to_string(), source };
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held(dir.display().to_string())),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// Loads or creates the cloud key (a 32-byte file, mode 0600).
pub fn load_key(dir: &Path) -> anyhow::Result<DeviceKey> {
    let path = dir.join("cloud.key");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let bytes: [u8; 32] =
                bytes.try_into().map_err(|_| anyhow::anyhow!("{}: not a 32-byte key", path.display()))?;
            Ok(DeviceKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::fill(&mut bytes);
            write_private(&path, &bytes)?;
            Ok(DeviceKey::from_bytes(&bytes))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a file only the owner can read, durably.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    transport::store::write_private(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: invalid PEM", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?)
}

/// A self-signed certificate for `names`, kept in the data directory (made once: nodes pin it).
fn self_signed(dir: &Path, names: &[String]) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("relay-cert.pem"), dir.join("relay-key.pem"));
    if !cert.exists() || !key.exists() {
        let made =
            rcgen::generate_simple_self_signed(names.to_vec()).context("making a self-signed certificate")?;
        write_private(&key, made.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&cert, made.cert.pem()).with_context(|| format!("writing {}", cert.display()))?;
    }
    Ok((cert, key))
}

/// Starts the relay: storage, the cloud endpoint, the iroh relay server and the HTTP API.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    // Before anything else touches the directory: a second relay stops here at once.
    let lock = lock_data_dir(&cfg.data_dir)?;
    let key = load_key(&cfg.data_dir)?;
    let store = transport::store::Store::open(&cfg.data_dir.join("relay.redb"), "relay")
        .with_context(|| format!("opening {}", cfg.data_dir.join("relay.redb").display()))?;
    let mut epoch = [0u8; 8];
    rand::fill(&mut epoch);
    let cloud = Arc::new(Cloud::load(store, key.clone(), cfg.limits.clone(), u64::from_le_bytes(epoch))?);

    // The iroh relay server.
    let mut relay_cfg = iroh_relay::server::RelayConfig::new(cfg.relay);
    let mut own_ca = None;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(tls_config(cert, key)?),
        (None, None) if !cfg.tls_self_signed.is_empty() => {
            let (cert, key) = self_signed(&cfg.data_dir, &cfg.tls_self_signed)?;
            own_ca = Some(std::fs::read_to_string(&cert)?);
            Some(tls_config(&cert, &key)?)
        }
        (None, None) => None,
        _ => anyhow::bail!("tls_cert and tls_key go together"),
    };
    let https = tls.is_some();
    if let Some(server_config) = tls {
        relay_cfg.tls = Some(iroh_relay::server::TlsConfig::new(
            cfg.relay,
            iroh_relay::server::CertConfig::Manual { server_config },
        ));
        // Plain HTTP then only redirects; bind it on an ephemeral port beside the HTTPS one.
        relay_cfg.http_bind_addr = SocketAddr::new(cfg.relay.ip(), 0);
    }
    let relay_clients = Arc::new(std::sync::atomic::AtomicI64::new(0));
    relay_cfg.access = Arc::new(http::RelayAccess { cloud: cloud.clone(), clients: relay_clients.clone() });
    let mut server_cfg = iroh_relay::server::ServerConfig::default();
    server_cfg.relay = Some(relay_cfg);
    if https && !cfg.no_qad {
        let bind = cfg.qad.unwrap_or_else(|| {
            SocketAddr::new(cfg.relay.ip(), iroh_relay::defaults::DEFAULT_RELAY_QUIC_PORT)
        });
        server_cfg.quic = Some(iroh_relay::server::QuicConfig::new(bind));
    }
    let relay_server = iroh_relay::server::Server::spawn(server_cfg)
        .await
        .context("starting the iroh relay server (and QUIC address discovery, when TLS is on)")?;
    let qad_addr = relay_server.quic_addr();
    let qad_port = qad_addr.map(|a| cfg.public_qad_port.unwrap_or(a.port()));
    let bound = if https { relay_server.https_addr() } else { relay_server.http_addr() }
        .ok_or_else(|| anyhow::anyhow!("relay server has no address"))?;
    let relay_url: iroh::RelayUrl = match &cfg.public_relay_url {
        Some(u) => u.parse().with_context(|| format!("public_relay_url {u:?}"))?,
        None => format!("{}://{}", if https { "https" } else { "http" }, bound).parse()?,
    };

    // The cloud endpoint: it uses its own relay too, so devices behind NATs reach it.
    let endpoint = transport::endpoint(
        &key,
        &transport::EndpointOptions {
            relay: Some(relay_url.clone()),
            relay_qad_port: qad_port,
            bind: Some(cfg.quic),
            // The cloud endpoint reaches its own relay too: trust its self-signed certificate.
            relay_ca_pem: own_ca,
            relay_only: false,
        },
    )
    .await
    .context("binding the cloud endpoint")?;
    for addr in &cfg.public_addrs {
        endpoint.add_external_addr(*addr).await;
    }

    let admin_token = match &cfg.admin_token {
        Some(t) => t.clone(),
        None => {
            let path = cfg.data_dir.join("admin.token");
            match std::fs::read_to_string(&path) {
                Ok(t) => t.trim().to_string(),
                Err(_) => {
                    let t = cloud::random_token();
                    write_private(&path, t.as_bytes())?;
                    t
                }
            }
        }
    };
    cloud.set_admin_token(&admin_token);

    let mut tasks = Vec::new();
    // The engine's session timers: the cloud's one host loop is this task and the pump every
    // input path calls (`cloud::driver`).
    tasks.push(cloud.spawn_timers());
    tasks.push(tokio::spawn(quic::accept(endpoint.clone(), cloud.clone())));

    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("binding HTTP {}", cfg.http))?;
    let http_addr = listener.local_addr()?;
    let app = http::router(http::App {
        cloud: cloud.clone(),
        endpoint: endpoint.clone(),
        relay_url: relay_url.clone(),
        qad_port,
        relay_clients,
        guard: Arc::new(http::Guard::new(&cfg.limits, cfg.trusted_proxies.clone())),
        posting: Arc::new(tokio::sync::Semaphore::new(http::POSTS_AT_ONCE)),
    });
    let bounds = http::conn::Bounds::new(&cfg.limits, cfg.trusted_proxies.clone());
    tasks.push(tokio::spawn(http::conn::serve(listener, app, bounds, cloud.metrics.clone())));
    tracing::info!(cloud = %cloud.id, http = %http_addr, relay = %relay_url, qad = ?qad_addr, "relay started");
    Ok(Running {
        cloud,
        http_addr,
        relay_url,
        qad_addr,
        qad_port,
        endpoint,
        admin_token,
        relay_server: Some(relay_server),
        tasks,
        lock: Some(lock),
    })
}

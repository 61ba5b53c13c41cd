//! The `feedmesh-relay` binary as its own process, for the end-to-end benchmarks that measure the
//! relay from outside (`e2e_sync --idle-devices`, `relay_load`), and what they read about it and
//! the machine: resident memory, load average.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{anyhow, bail, Context};
use iroh::{EndpointAddr, RelayUrl, TransportAddr};

/// The relay process, killed when dropped.
#[derive(Debug)]
pub struct RelayProcess {
    child: Child,
    pub relay_url: RelayUrl,
    /// The HTTP API.
    pub http: SocketAddr,
    /// The cloud endpoint's id.
    pub cloud: iroh::EndpointId,
    /// The cloud endpoint's UDP addresses.
    pub cloud_udp: Vec<SocketAddr>,
    data: tempfile::TempDir,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `feedmesh-relay` binary: `given`, or the one beside this executable (the same profile's
/// target directory). An error says how to build it when it is missing.
pub fn relay_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?.with_file_name("feedmesh-relay"),
    };
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p feedmesh-relay` first (or pass --relay-bin)",
            bin.display()
        );
    }
    Ok(bin)
}

impl RelayProcess {
    /// Starts `feedmesh-relay` on loopback ports, with a fresh data directory and its default
    /// limits, and reads the addresses it prints.
    pub fn spawn(bin: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(bin, None)
    }

    /// [`RelayProcess::spawn`] with a relay config file of this TOML text (e.g. a `[limits]`
    /// table), written into the data directory and passed as `--config`.
    pub fn spawn_with(bin: &Path, config: Option<&str>) -> anyhow::Result<Self> {
        use std::io::{BufRead, BufReader};
        let data = tempfile::tempdir()?;
        let mut command = Command::new(bin);
        if let Some(text) = config {
            let path = data.path().join("relay.toml");
            std::fs::write(&path, text)?;
            command.arg("--config").arg(path);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data.path())
            .args(["--http", "127.0.0.1:0", "--relay", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
            .env("FEEDMESH_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("the relay's stdout is not piped"))?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut relay_url, mut http, mut cloud, mut cloud_udp) = (None, None, None, Vec::new());
        for line in lines.by_ref() {
            let line = line?;
            let Some((name, value)) = line.trim().split_once(':') else { continue };
            let value = value.trim();
            match name {
                "HTTP API" => http = Some(value.trim_start_matches("http://").parse()?),
                "relay" => relay_url = Some(value.parse()?),
                "cloud id" => {
                    cloud = node::state::parse_device_hex(value).and_then(|d| transport::endpoint_id(&d))
                }
                "cloud UDP" => {
                    cloud_udp = value.split(", ").map(str::parse).collect::<Result<_, _>>()?;
                }
                "devices join with" => break,
                _ => {}
            }
        }
        // Keep draining, so the relay never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        let (Some(relay_url), Some(http), Some(cloud)) = (relay_url, http, cloud) else {
            let _ = child.kill();
            let status = child.wait()?;
            bail!("feedmesh-relay did not print its addresses ({status})");
        };
        Ok(Self { child, relay_url, http, cloud, cloud_udp, data })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The relay's data directory (key, database, `admin.token`).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The admin bearer token the relay generated into its data directory.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let path = self.data_dir().join("admin.token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .into())
    }

    /// The cloud endpoint's address: the relay URL and its UDP sockets.
    pub fn cloud_addr(&self) -> EndpointAddr {
        let addrs = std::iter::once(TransportAddr::Relay(self.relay_url.clone()))
            .chain(self.cloud_udp.iter().map(|a| TransportAddr::Ip(*a)));
        EndpointAddr::from_parts(self.cloud, addrs)
    }

    /// The cloud endpoint's address over UDP only (for clients that are not devices yet, which
    /// the relay server would refuse).
    pub fn cloud_udp_addr(&self) -> EndpointAddr {
        EndpointAddr::from_parts(self.cloud, self.cloud_udp.iter().map(|a| TransportAddr::Ip(*a)))
    }

    /// The relay's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(self.http).await?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").await?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await?;
        Ok(text)
    }

    /// One gauge of the relay's `/metrics`.
    pub async fn gauge(&self, name: &str) -> anyhow::Result<i64> {
        self.metrics()
            .await?
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("/metrics has no {name}"))
    }
}

/// A process's resident set (VmRSS) in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| anyhow!("process {pid} has no VmRSS (has it exited?)"))
}

/// The 1-, 5- and 15-minute load averages (other work on the machine skews the figures).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map_or_else(|_| "?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

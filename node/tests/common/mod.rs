//! Test harness: a relay in this process, nodes as real `feedmesh` processes.

#![allow(dead_code)]

pub mod feedcheck;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PASSWORD: &str = "correct horse battery";

/// The relay, running on a runtime owned by the test.
pub struct Relay {
    pub rt: tokio::runtime::Runtime,
    pub running: Option<relay::Running>,
    pub url: String,
    pub _dir: tempfile::TempDir,
}

impl Relay {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// A relay with its config adjusted by `f` (addresses stay on loopback ports chosen by the OS).
    pub fn start_with(f: impl FnOnce(&mut relay::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut cfg = relay::Config::loopback(dir.path());
        f(&mut cfg);
        let running = rt.block_on(relay::start(cfg)).expect("relay starts");
        let url = format!("http://{}", running.http_addr);
        Self { rt, running: Some(running), url, _dir: dir }
    }

    /// Stops the relay and starts it again on the same data directory and addresses (devices
    /// keep the addresses they were given at `init`).
    pub fn restart(&mut self) {
        let running = self.running.take().unwrap();
        let mut cfg = relay::Config::loopback(self._dir.path());
        cfg.http = running.http_addr;
        cfg.relay = format!("{}:{}", "127.0.0.1", running.relay_url.port().unwrap()).parse().unwrap();
        cfg.quic = *running.endpoint.bound_sockets().iter().find(|a| a.is_ipv4()).unwrap();
        cfg.qad = running.qad_addr;
        self.rt.block_on(running.shutdown());
        let running = self.rt.block_on(relay::start(cfg)).expect("relay starts again");
        self.running = Some(running);
    }

    pub fn cloud(&self) -> &std::sync::Arc<relay::Cloud> {
        &self.running.as_ref().unwrap().cloud
    }

    pub fn admin_token(&self) -> String {
        self.running.as_ref().unwrap().admin_token.clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            self.rt.block_on(r.shutdown());
        }
    }
}

/// One device: a data directory, and its daemon when running.
pub struct Dev {
    pub name: &'static str,
    pub dir: PathBuf,
    pub daemon: Option<Child>,
    /// Run inside this network namespace (`ip netns exec`).
    pub ns: Option<String>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_feedmesh")
}

impl Dev {
    pub fn new(root: &Path, name: &'static str) -> Self {
        Self { name, dir: root.join(name), daemon: None, ns: None }
    }

    /// The `feedmesh` command for this device (inside its namespace, if any).
    pub fn command(&self) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        self.command()
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .env("FEEDMESH_PASSWORD", PASSWORD)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "{} {:?} failed: {}{}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Retries a command until it succeeds (state that must first arrive through the cloud).
    pub fn ok_eventually(&self, args: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let out = self.cmd(args);
            if out.status.success() {
                return String::from_utf8(out.stdout).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{} {:?} still failing: {}",
                self.name,
                args,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn start(&mut self) {
        self.start_args(&[]);
    }

    /// Starts the daemon with extra environment variables.
    pub fn start_env(&mut self, env: &[(&str, &str)]) {
        self.start_with(&[], env);
    }

    /// Starts the daemon with extra `run` flags.
    pub fn start_args(&mut self, extra: &[&str]) {
        self.start_with(extra, &[]);
    }

    pub fn start_with(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        assert!(self.daemon.is_none());
        let _ = std::fs::remove_file(self.dir.join("api.json"));
        let child = self
            .command()
            .arg("--dir")
            .arg(&self.dir)
            .arg("run")
            .args(if extra.contains(&"--interval") { &[][..] } else { &["--interval", "1"][..] })
            .args(extra)
            .envs(env.iter().copied())
            .env(
                "FEEDMESH_LOG",
                std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "warn,noq_proto=error,iroh=error".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        wait_for(Duration::from_secs(30), || self.dir.join("api.json").exists(), "daemon's api.json");
    }

    /// Stops the daemon with SIGKILL (no clean shutdown at all).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        let _ = std::fs::remove_file(self.dir.join("api.json"));
    }

    /// The local API address and token.
    pub fn api(&self) -> (String, String) {
        let text = std::fs::read_to_string(self.dir.join("api.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        (format!("http://{}", v["addr"].as_str().unwrap()), v["token"].as_str().unwrap().to_string())
    }

    /// `pair --account`, run in the background; returns the code it shows and the child.
    pub fn pair(&self, account: &str) -> (String, Child) {
        let mut child = self
            .command()
            .arg("--dir")
            .arg(&self.dir)
            .args(["pair", "--account", account, "--timeout", "60"])
            .env("FEEDMESH_PASSWORD", PASSWORD)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let code = loop {
            let line = lines.next().expect("pair printed its code").unwrap();
            if let Some(code) = line.strip_prefix("pairing code: ") {
                break code.trim().to_string();
            }
        };
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (code, child)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` until it holds or `within` passes (then fails naming `what`).
pub fn wait_for(within: Duration, cond: impl FnMut() -> bool, what: &str) {
    wait_for_showing(within, cond, what, String::new)
}

/// [`wait_for`], printing `show()` when it times out.
pub fn wait_for_showing(
    within: Duration,
    mut cond: impl FnMut() -> bool,
    what: &str,
    show: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", show());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Item ids a device lists in a folder.
pub fn ids(dev: &Dev, folder: &str) -> Vec<String> {
    let out = dev.cmd(&["ls", folder]);
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('\t').next())
        .map(str::to_string)
        .collect()
}

/// The folder exported as Atom (equal exports mean equal replicas).
pub fn export(dev: &Dev, folder: &str) -> String {
    dev.ok(&["export", folder, "--format", "atom"])
}

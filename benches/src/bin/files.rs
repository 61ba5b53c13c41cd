//! Live Folders throughput (issue 14): the same files from one device to another over loopback,
//! side by side in one run, three ways:
//!
//! - **feedmesh**: a relay in this process and two real `feedmesh` daemons (the binary beside
//!   this one in the target directory) of two users; Alice's device has the data mapped and
//!   published in a `p2p` folder shared with Bob. Timed from Bob accepting the folder and mapping
//!   an empty directory (metadata sync, content fetch, bao verification, writes) until every
//!   file is in Bob's directory whole;
//! - **bare iroh**: two endpoints, one QUIC stream carrying the same bytes (the files one after
//!   another), the receiver writing them to one file and syncing it once: the limit;
//! - **Syncthing** (Debian package `syncthing`, skipped with a note when it is not installed):
//!   two instances on 127.0.0.1 (no discovery, relays or NAT traversal); the sender's folder
//!   scanned first; timed from the receiver adding the folder until it holds every file.
//!
//! Two data sets: one large file (1 GiB; `--quick`: 64 MiB) and a tree of small files (10,000
//! of 1-64 KiB in 100 directories; `--quick`: 500), generated from a fixed seed. Every
//! receiver's copy is checked byte for byte after its run (outside the timing).
//!
//! Each data set runs `--runs` times (default 3), the three ways taking turns within each round
//! so that the machine's noise (a shared VM's disk and CPU vary by a third between runs) falls on
//! all of them alike; the table shows each one's best run and the JSON every run. Rounds keep
//! their directories until the end (the work directory needs about 4 GiB per round).
//!
//! Usage (from the workspace root): `cargo build --release -p feedmesh-node && cargo run
//! --release -p feedmesh-benches --bin files -- [--quick] [--json papers/results/files.json]`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Live Folders throughput: feedmesh against a bare iroh stream and Syncthing")]
struct Args {
    /// Small data sets (64 MiB, 500 files): a smoke run.
    #[arg(long)]
    quick: bool,
    /// Where to write the results.
    #[arg(long, default_value = "papers/results/files.json")]
    json: PathBuf,
    /// Work directory (default: a fresh one under the system's temp directory).
    #[arg(long)]
    work: Option<PathBuf>,
    /// Leave Syncthing out even when it is installed.
    #[arg(long)]
    no_syncthing: bool,
    /// Only one data set: `large` or `small`.
    #[arg(long, value_parser = ["large", "small"])]
    only: Option<String>,
    /// Rounds per data set (each runs all three ways); the best of each is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
}

const PASSWORD: &str = "benchmark password";
const WITHIN: Duration = Duration::from_secs(1800);

/// One data set: its files (relative path, size) under `root`.
struct Data {
    name: &'static str,
    root: PathBuf,
    files: Vec<(String, u64)>,
}

impl Data {
    fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, s)| s).sum()
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let feedmesh = std::env::current_exe()?.with_file_name("feedmesh");
    if !feedmesh.exists() {
        bail!("{} is missing: build it first (cargo build --release -p feedmesh-node)", feedmesh.display());
    }
    let tmp;
    let work = match &args.work {
        Some(w) => w.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let (big, count) = if args.quick { (64u64 << 20, 500) } else { (1u64 << 30, 10_000) };
    eprintln!("generating data in {} ...", work.display());
    let mut sets = Vec::new();
    if args.only.as_deref() != Some("small") {
        sets.push(large(&work.join("large"), big)?);
    }
    if args.only.as_deref() != Some("large") {
        sets.push(tree(&work.join("tree"), count)?);
    }
    let syncthing = !args.no_syncthing && Command::new("syncthing").arg("--version").output().is_ok();
    if !syncthing {
        eprintln!("Syncthing left out (--no-syncthing, or not installed: apt-get install syncthing)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results = Vec::new();
    for data in &sets {
        eprintln!("{}: {} files, {:.1} MiB", data.name, data.files.len(), data.bytes() as f64 / 1048576.0);
        let (mut bares, mut ourses, mut theirses) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=args.runs {
            eprintln!("  round {round} of {}", args.runs);
            // Each round in a directory of its own, all removed at the end: deleting a round's
            // tens of thousands of files just before the next one made file creation in it
            // several times slower on this machine's file system (ext4 without a journal scans
            // for inodes not recently freed), falling hardest on whichever tool creates most.
            let work = work.join(format!("{}-round-{round}", data.name.replace(' ', "-")));
            std::fs::create_dir_all(&work)?;
            // Every run starts with nothing dirty in the page cache: the data just generated,
            // or what the run before wrote, would otherwise be written back during the next one.
            settle();
            let bare = rt.block_on(bare_iroh(data, &work))?;
            eprintln!("    bare iroh stream: {bare:.2} s");
            bares.push(bare);
            settle();
            let ours = run_feedmesh(&rt, &feedmesh, data, &work)?;
            eprintln!("    feedmesh: {ours:.2} s");
            ourses.push(ours);
            settle();
            if syncthing {
                let s = run_syncthing(data, &work)?;
                eprintln!("    syncthing: {s:.2} s");
                theirses.push(s);
            }
        }
        let best =
            |v: &[f64]| v.iter().copied().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))));
        let (bare, ours, theirs) =
            (best(&bares).unwrap_or(f64::NAN), best(&ourses).unwrap_or(f64::NAN), best(&theirses));
        let mib = data.bytes() as f64 / 1048576.0;
        results.push(json!({
            "data": data.name,
            "files": data.files.len(),
            "bytes": data.bytes(),
            "bare_iroh_seconds": round(bare),
            "feedmesh_seconds": round(ours),
            "syncthing_seconds": theirs.map(round),
            "bare_iroh_mib_per_s": round(mib / bare),
            "feedmesh_mib_per_s": round(mib / ours),
            "syncthing_mib_per_s": theirs.map(|s| round(mib / s)),
            "feedmesh_vs_bare": round(bare / ours),
            "feedmesh_vs_syncthing": theirs.map(|s| round(s / ours)),
            "runs": {
                "bare_iroh_seconds": bares.iter().map(|x| round(*x)).collect::<Vec<_>>(),
                "feedmesh_seconds": ourses.iter().map(|x| round(*x)).collect::<Vec<_>>(),
                "syncthing_seconds": theirses.iter().map(|x| round(*x)).collect::<Vec<_>>(),
            },
        }));
    }
    let out = json!({
        "command": format!(
            "cargo run --release -p feedmesh-benches --bin files --{}{}",
            if args.quick { " --quick" } else { "" },
            if args.runs == 3 { String::new() } else { format!(" --runs {}", args.runs) }
        ),
        "machine": machine(),
        "note": "loopback, one machine: sender, receiver and (for feedmesh) the relay share the cores; each figure the best of the runs (all in \"runs\"); ratios: *_vs_bare = bare seconds / feedmesh seconds (goal >= 0.8 for the large file), *_vs_syncthing = syncthing seconds / feedmesh seconds (goal > 1)",
        "results": results,
    });
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)? + "\n")?;
    println!("{}", table(&out));
    println!("written to {}", args.json.display());
    Ok(())
}

/// Flushes what is dirty (sync(1)) so a run does not pay for the one before.
fn settle() {
    let _ = Command::new("sync").status();
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
        c.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
    });
    json!({ "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), "cpu": cpu })
}

fn table(out: &Value) -> String {
    let mut s = String::from("| data | files | MiB | bare iroh | feedmesh | Syncthing | feedmesh/bare | feedmesh vs Syncthing |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in out["results"].as_array().into_iter().flatten() {
        let secs = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.2} s"));
        let ratio = |k: &str| r[k].as_f64().map_or("-".to_string(), |v| format!("{v:.2}x"));
        s.push_str(&format!(
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} |\n",
            r["data"].as_str().unwrap_or(""),
            r["files"],
            r["bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
            secs("bare_iroh_seconds"),
            secs("feedmesh_seconds"),
            secs("syncthing_seconds"),
            ratio("feedmesh_vs_bare"),
            ratio("feedmesh_vs_syncthing"),
        ));
    }
    let runs = out["results"][0]["runs"]["feedmesh_seconds"].as_array().map_or(0, Vec::len);
    s.push_str(&format!("\nEach figure is the best of {runs} runs (every run is in the JSON).\n"));
    s
}

// ------------------------------------------------------------------ data

fn hour_ago(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::options().write(true).open(path)?;
    file.set_modified(SystemTime::now() - Duration::from_secs(3600))?;
    Ok(())
}

fn write_random(path: &Path, size: u64, rng: &mut rand_chacha::ChaCha8Rng) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    drop(out);
    hour_ago(path)
}

fn large(root: &Path, size: u64) -> anyhow::Result<Data> {
    std::fs::create_dir_all(root)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
    write_random(&root.join("large.bin"), size, &mut rng)?;
    Ok(Data { name: "one large file", root: root.to_path_buf(), files: vec![("large.bin".into(), size)] })
}

fn tree(root: &Path, count: usize) -> anyhow::Result<Data> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(41);
    let mut files = Vec::new();
    for i in 0..count {
        let rel = format!("d{:02}/f{i:05}.bin", i % 100);
        let size = rng.random_range(1024..=64 * 1024u64);
        std::fs::create_dir_all(root.join(format!("d{:02}", i % 100)))?;
        write_random(&root.join(&rel), size, &mut rng)?;
        files.push((rel, size));
    }
    Ok(Data { name: "small files", root: root.to_path_buf(), files })
}

/// A copy of the data set's files (hard links: no bytes copied) in `to`.
fn link_copy(data: &Data, to: &Path) -> anyhow::Result<()> {
    for (rel, _) in &data.files {
        let dest = to.join(rel);
        std::fs::create_dir_all(dest.parent().expect("a file has a parent"))?;
        std::fs::hard_link(data.root.join(rel), &dest)?;
    }
    Ok(())
}

/// Whether `dir` holds every file of the set at its size (cheap: metadata only).
fn complete(data: &Data, dir: &Path) -> bool {
    data.files.iter().all(|(rel, size)| std::fs::metadata(dir.join(rel)).is_ok_and(|m| m.len() == *size))
}

/// Checks every file byte for byte (after a run, untimed).
fn check_same(data: &Data, dir: &Path, who: &str) -> anyhow::Result<()> {
    for (rel, _) in &data.files {
        let (a, b) = (
            std::fs::read(data.root.join(rel))?,
            std::fs::read(dir.join(rel)).with_context(|| format!("{who}: {rel}"))?,
        );
        if a != b {
            bail!("{who}: {rel} differs from the source");
        }
    }
    Ok(())
}

fn wait_until(what: &str, mut cond: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WITHIN;
    while !cond()? {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ------------------------------------------------------------------ bare iroh

/// One QUIC stream of the set's bytes between two fresh endpoints on loopback; the receiver
/// writes them to one file and syncs it once. Seconds from the stream's opening to the
/// receiver's answer.
async fn bare_iroh(data: &Data, work: &Path) -> anyhow::Result<f64> {
    use tokio::io::AsyncWriteExt;
    let key = || {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        engine::signing::DeviceKey::from_bytes(&seed)
    };
    let opts = transport::EndpointOptions {
        relay: None,
        bind: Some("127.0.0.1:0".parse()?),
        relay_qad_port: None,
        relay_ca_pem: None,
        relay_only: false,
    };
    let server = transport::endpoint(&key(), &opts).await?;
    let client = transport::endpoint(&key(), &opts).await?;
    let addr = iroh::EndpointAddr::from_parts(
        server.id(),
        server.bound_sockets().into_iter().map(iroh::TransportAddr::Ip),
    );
    let sink = work.join("bare.out");
    let receiver = {
        let (server, sink) = (server.clone(), sink.clone());
        tokio::spawn(async move {
            let conn = server.accept().await.ok_or_else(|| anyhow!("no connection"))?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut file = tokio::fs::File::create(&sink).await?;
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0u64;
            while let Some(n) = recv.read(&mut buf).await? {
                got += n as u64;
                file.write_all(&buf[..n]).await?;
            }
            file.sync_all().await?;
            send.write_all(&got.to_be_bytes()).await?;
            send.finish()?;
            conn.closed().await;
            anyhow::Ok(got)
        })
    };
    let conn = client.connect(addr, transport::ALPN).await?;
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = vec![0u8; 1 << 20];
    for (rel, _) in &data.files {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(data.root.join(rel)).await?;
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n]).await?;
        }
    }
    send.finish()?;
    let mut answer = [0u8; 8];
    recv.read_exact(&mut answer).await?;
    let seconds = started.elapsed().as_secs_f64();
    conn.close(0u32.into(), b"done");
    let got = receiver.await??;
    if got != data.bytes() || u64::from_be_bytes(answer) != got {
        bail!("bare: the receiver got {got} of {} bytes", data.bytes());
    }
    let _ = std::fs::remove_file(&sink);
    server.close().await;
    client.close().await;
    Ok(seconds)
}

// ------------------------------------------------------------------ feedmesh

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fm(bin: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env("FEEDMESH_PASSWORD", PASSWORD)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "feedmesh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn fm_eventually(bin: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match fm(bin, dir, args) {
            Ok(out) => return Ok(out),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn daemon(bin: &Path, dir: &Path) -> anyhow::Result<Daemon> {
    let child = Command::new(bin)
        .arg("--dir")
        .arg(dir)
        .args(["run", "--interval", "1"])
        .env("FEEDMESH_LOG", std::env::var("FEEDMESH_BENCH_LOG").unwrap_or_else(|_| "error".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let api = dir.join("api.json");
    wait_until("the daemon's api.json", || Ok(api.exists()))?;
    Ok(Daemon(child))
}

fn run_feedmesh(rt: &tokio::runtime::Runtime, bin: &Path, data: &Data, work: &Path) -> anyhow::Result<f64> {
    let root = work.join("feedmesh");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let cfg = relay::Config::loopback(&root.join("relay"));
    let relay = rt.block_on(relay::start(cfg))?;
    let url = format!("http://{}", relay.http_addr);
    let (a, b) = (root.join("a"), root.join("b"));
    fm(bin, &a, &["init", "--relay", &url, "--name", "alice", "--account", "alice"])?;
    fm(bin, &b, &["init", "--relay", &url, "--name", "bob"])?;
    let _da = daemon(bin, &a)?;
    let _db = daemon(bin, &b)?;
    fm(bin, &a, &["folder", "create", "bench", "--p2p"])?;
    fm_eventually(bin, &a, &["folder", "share", "bench", "bob"])?;
    let (src, dst) = (root.join("alice-files"), root.join("bob-files"));
    link_copy(data, &src)?;
    fm(bin, &a, &["folder", "map", "bench", src.to_str().ok_or_else(|| anyhow!("path"))?])?;
    let n = data.files.len();
    wait_until("alice's files published", || {
        fm(bin, &a, &["folder", "scan", "bench"])?;
        Ok(fm(bin, &a, &["folder", "ls"])?.contains(&format!(", {n} items,")))
    })?;
    // Timed: Bob takes the folder (its metadata) and maps an empty directory (its content).
    let started = Instant::now();
    fm_eventually(bin, &b, &["folder", "accept", "bench"])?;
    fm(bin, &b, &["folder", "map", "bench", dst.to_str().ok_or_else(|| anyhow!("path"))?])?;
    wait_until("every file at bob", || Ok(complete(data, &dst)))?;
    let seconds = started.elapsed().as_secs_f64();
    check_same(data, &dst, "feedmesh")?;
    drop((_da, _db));
    rt.block_on(relay.shutdown());
    Ok(seconds)
}

// ------------------------------------------------------------------ Syncthing

struct Syncthing {
    child: Child,
    gui: String,
    key: String,
    id: String,
}

impl Drop for Syncthing {
    /// Stops the whole process group: `syncthing serve` runs its monitor and the real process.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("--").arg(format!("-{}", self.child.id())).status();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Generates a home, turns off everything that reaches beyond loopback, and starts it.
fn syncthing(home: &Path, listen: u16) -> anyhow::Result<Syncthing> {
    let out = Command::new("syncthing")
        .args(["generate", "--no-default-folder"])
        .arg(format!("--home={}", home.display()))
        .output()?;
    if !out.status.success() {
        bail!("syncthing generate: {}", String::from_utf8_lossy(&out.stderr));
    }
    let config = home.join("config.xml");
    let mut xml = std::fs::read_to_string(&config)?;
    for (from, to) in [
        (
            "<listenAddress>default</listenAddress>".to_string(),
            format!("<listenAddress>tcp://127.0.0.1:{listen}</listenAddress>"),
        ),
        ("<globalAnnounceEnabled>true".into(), "<globalAnnounceEnabled>false".into()),
        ("<localAnnounceEnabled>true".into(), "<localAnnounceEnabled>false".into()),
        ("<relaysEnabled>true".into(), "<relaysEnabled>false".into()),
        ("<natEnabled>true".into(), "<natEnabled>false".into()),
        ("<crashReportingEnabled>true".into(), "<crashReportingEnabled>false".into()),
        ("<urAccepted>0".into(), "<urAccepted>-1".into()),
        ("<autoUpgradeIntervalH>12".into(), "<autoUpgradeIntervalH>0".into()),
        ("<startBrowser>true".into(), "<startBrowser>false".into()),
    ] {
        xml = xml.replace(&from, &to);
    }
    std::fs::write(&config, xml)?;
    let id = String::from_utf8(
        Command::new("syncthing")
            .args(["serve", "--device-id"])
            .arg(format!("--home={}", home.display()))
            .output()?
            .stdout,
    )?
    .trim()
    .to_string();
    let gui = format!("127.0.0.1:{}", free_port()?);
    let key = format!("bench{}", rand::rng().random::<u64>());
    let child = Command::new("syncthing")
        .args([
            "serve",
            "--no-browser",
            "--no-restart",
            "--no-upgrade",
            "--no-default-folder",
            "--skip-port-probing",
        ])
        .arg(format!("--home={}", home.display()))
        .arg(format!("--gui-address=http://{gui}"))
        .arg(format!("--gui-apikey={key}"))
        .env("STNODEFAULTFOLDER", "1")
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let st = Syncthing { child, gui, key, id };
    wait_until("syncthing's API", || Ok(st.get("/rest/system/ping").is_ok()))?;
    Ok(st)
}

impl Syncthing {
    fn client() -> reqwest::blocking::Client {
        reqwest::blocking::Client::new()
    }

    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let r =
            Self::client().get(format!("http://{}{path}", self.gui)).header("X-API-Key", &self.key).send()?;
        if !r.status().is_success() {
            bail!("syncthing GET {path}: {}", r.status());
        }
        Ok(r.json()?)
    }

    fn post(&self, path: &str, body: Value) -> anyhow::Result<()> {
        let r = Self::client()
            .post(format!("http://{}{path}", self.gui))
            .header("X-API-Key", &self.key)
            .json(&body)
            .send()?;
        if !r.status().is_success() {
            bail!("syncthing POST {path}: {} {}", r.status(), r.text().unwrap_or_default());
        }
        Ok(())
    }

    fn add_device(&self, other: &Syncthing, port: u16) -> anyhow::Result<()> {
        self.post(
            "/rest/config/devices",
            json!({ "deviceID": other.id, "name": "peer", "addresses": [format!("tcp://127.0.0.1:{port}")] }),
        )
    }

    fn add_folder(&self, path: &Path, other: &Syncthing) -> anyhow::Result<()> {
        self.post(
            "/rest/config/folders",
            json!({
                "id": "bench", "label": "bench", "path": path, "type": "sendreceive",
                "devices": [{ "deviceID": self.id }, { "deviceID": other.id }],
                "fsWatcherEnabled": false, "rescanIntervalS": 3600,
            }),
        )
    }

    /// Whether the folder is idle with `files` files local and nothing needed (Syncthing's byte
    /// counts include 128 bytes per directory, so files are counted instead).
    fn holds(&self, files: usize) -> anyhow::Result<bool> {
        let s = match self.get("/rest/db/status?folder=bench") {
            Ok(s) => s,
            Err(_) => return Ok(false),
        };
        Ok(s["state"] == "idle"
            && s["localFiles"].as_u64() == Some(files as u64)
            && s["needBytes"].as_u64() == Some(0))
    }
}

fn run_syncthing(data: &Data, work: &Path) -> anyhow::Result<f64> {
    let root = work.join("syncthing");
    let _ = std::fs::remove_dir_all(&root);
    let (src, dst) = (root.join("sender-files"), root.join("receiver-files"));
    link_copy(data, &src)?;
    std::fs::create_dir_all(&dst)?;
    let (ps, pr) = (free_port()?, free_port()?);
    let s = syncthing(&root.join("sender"), ps)?;
    let r = syncthing(&root.join("receiver"), pr)?;
    s.add_device(&r, pr)?;
    r.add_device(&s, ps)?;
    s.add_folder(&src, &r)?;
    let files = data.files.len();
    wait_until("the sender's scan", || s.holds(files))?;
    wait_until("the two instances connected", || {
        Ok(r.get("/rest/system/connections")?["connections"][&s.id]["connected"] == true)
    })?;
    // Timed: the receiver takes the folder (index and content).
    let started = Instant::now();
    r.add_folder(&dst, &s)?;
    wait_until("every file at the receiver", || Ok(complete(data, &dst) && r.holds(files)?))?;
    let seconds = started.elapsed().as_secs_f64();
    check_same(data, &dst, "syncthing")?;
    drop((s, r));
    Ok(seconds)
}

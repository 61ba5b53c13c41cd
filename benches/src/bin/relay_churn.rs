//! What a relay keeps per QUIC connection from a new key (issue 11, defect 9).
//!
//! Starts `feedmesh-relay` (beside this binary) with the handshake gate opened wide, makes N
//! connections to its cloud endpoint, each from a fresh endpoint with a new key (connect, close),
//! 16 at a time, and prints the relay's resident memory every 500 connections and again after a
//! settle time (default 130 s: iroh keeps per-remote state for 60 s after the last connection).
//! `RELAY_WRAP="valgrind --tool=massif --time-unit=ms"` runs the relay under a heap profiler.
//!
//! `cargo build -p feedmesh-relay -p feedmesh-benches --bins && target/debug/relay_churn 3000 90`
//! (debug builds of our crates are enough: the memory is held in dependencies, built optimised).
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use engine::signing::DeviceKey;
use iroh::{EndpointAddr, TransportAddr};
use transport::{EndpointOptions, ALPN};

fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
}

/// Asks the relay to stop (SIGINT), so a wrapping profiler writes its output.
fn interrupt(pid: u32) {
    let _ = Command::new("kill").arg("-INT").arg(pid.to_string()).status();
    std::thread::sleep(Duration::from_secs(5));
}

fn main() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    if benches::help_requested(
        "relay_churn: connect and drop new device keys at a feedmesh-relay, and watch its memory\n\n\
         usage: relay_churn [CYCLES] [SETTLE_SECONDS]   (defaults 2000 and 130; RELAY_WRAP wraps the relay)",
    ) {
        return Ok(());
    }
    let n: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(2000);
    let settle: u64 = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(130);
    let bin = std::env::current_exe()?.with_file_name("feedmesh-relay");
    let data = tempfile::tempdir()?;
    let mut cmd = match std::env::var("RELAY_WRAP") {
        Ok(w) => {
            let mut parts = w.split_whitespace();
            let mut c = Command::new(parts.next().unwrap());
            c.args(parts).arg(&bin);
            c
        }
        Err(_) => Command::new(&bin),
    };
    // Measure retention, not the handshake gate: let every connection in.
    let config = data.path().join("relay.toml");
    std::fs::write(&config, "[limits]\nquic_handshakes_per_second = 100000\nquic_handshake_burst = 100000\nquic_handshakes_per_second_total = 100000\n")?;
    let mut child = cmd
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(data.path())
        .args(["--http", "127.0.0.1:0", "--relay", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .env("FEEDMESH_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut cloud, mut udp, mut http) = (None, Vec::<SocketAddr>::new(), String::new());
    for line in lines.by_ref() {
        let line = line?;
        let Some((k, v)) = line.trim().split_once(':') else { continue };
        let v = v.trim();
        match k {
            "cloud id" => cloud = node::state::parse_device_hex(v).and_then(|d| transport::endpoint_id(&d)),
            "HTTP API" => http = v.trim_start_matches("http://").to_string(),
            "cloud UDP" => udp = v.split(", ").map(|a| a.parse().unwrap()).collect(),
            "devices join with" => break,
            _ => {}
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let addr = EndpointAddr::from_parts(cloud.unwrap(), udp.iter().map(|a| TransportAddr::Ip(*a)));
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        println!("start rss {} KiB", rss(pid));
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let addr = addr.clone();
            set.spawn(async move {
                let mut seed = [0u8; 32];
                rand::fill(&mut seed);
                let key = DeviceKey::from_bytes(&seed);
                let opts = EndpointOptions {
                    bind: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
                    ..Default::default()
                };
                let ep = transport::endpoint(&key, &opts).await.unwrap();
                if let Ok(Ok(conn)) =
                    tokio::time::timeout(Duration::from_secs(10), ep.connect(addr, ALPN)).await
                {
                    conn.close(0u32.into(), b"bye");
                }
                ep.close().await;
                drop(permit);
            });
            if (i + 1) % 500 == 0 {
                while !set.is_empty() {
                    set.join_next().await;
                }
                println!("after {} connections rss {} KiB", i + 1, rss(pid));
            }
        }
        while !set.is_empty() {
            set.join_next().await;
        }
        tokio::time::sleep(Duration::from_secs(settle)).await;
        println!("+{settle}s rss {} KiB", rss(pid));
        let metrics = std::process::Command::new("curl")
            .arg("-s")
            .arg(format!("http://{http}/metrics"))
            .output()
            .unwrap();
        for l in String::from_utf8_lossy(&metrics.stdout).lines().filter(|l| {
            l.starts_with("feedmesh_connections")
                || l.starts_with("feedmesh_refusals")
                || l.starts_with("feedmesh_relay")
        }) {
            println!("{l}");
        }
        interrupt(pid);
    });
    let _ = child.kill();
    Ok(())
}

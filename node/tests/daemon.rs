//! The daemon's life (issue 13, item 5): SIGTERM stops it as cleanly as Ctrl-C (a line says so,
//! api.json goes, a write made before is there after a restart), and a second daemon on the same
//! data directory fails at once with a clear message.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Starts `a`'s daemon (a round a second), its stdout piped as lines, its stderr to `stderr`.
fn run_daemon(
    a: &Dev,
    stderr: Stdio,
) -> (std::process::Child, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut daemon = a
        .command()
        .arg("--dir")
        .arg(&a.dir)
        .args(["run", "--interval", "1"])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let lines = BufReader::new(daemon.stdout.take().unwrap()).lines();
    (daemon, lines)
}

#[test]
fn sigterm_stops_the_daemon_cleanly_and_a_second_daemon_fails_at_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let mut a = Dev::new(root.path(), "a");
    a.ok(&["init", "--relay", &relay.url, "--name", "alice"]);
    a.ok(&["folder", "create", "notes"]);
    let (mut daemon, mut lines) = run_daemon(&a, Stdio::inherit());
    let running = lines.next().unwrap().unwrap();
    assert!(running.starts_with("feedmesh device ") && running.ends_with(" running"), "{running}");
    assert!(a.dir.join("api.json").exists());
    a.ok(&["put", "notes", "n1", "kept"]);

    // A second daemon on the directory: refused in well under a second, naming the first.
    let t0 = Instant::now();
    let second = a.cmd(&["run"]);
    assert!(t0.elapsed() < Duration::from_secs(1), "refused at once, took {:?}", t0.elapsed());
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("another feedmesh daemon is running on")
            && err.contains(&format!("pid {}", daemon.id())),
        "{err}"
    );

    let killed =
        std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(daemon.wait().unwrap().success(), "SIGTERM is a clean stop: {rest:?}");
    assert!(rest.iter().any(|l| l == "feedmesh: SIGTERM: stopping"), "{rest:?}");
    assert_eq!(rest.last().map(String::as_str), Some("feedmesh: stopped"));
    assert!(!a.dir.join("api.json").exists(), "api.json is removed");
    // The directory is free for the CLI (no daemon), and the write is there.
    assert!(a.ok(&["ls", "notes"]).starts_with("n1\t"));
    a.start();
    assert!(a.ok(&["ls", "notes"]).starts_with("n1\t"));
    a.kill();
}

/// A daemon whose stdout nobody reads any more still stops cleanly on SIGTERM and keeps what it
/// wrote: before, its "stopping" line panicked on the closed pipe and skipped the clean stop.
#[test]
fn a_daemon_whose_stdout_was_closed_stops_cleanly() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let a = Dev::new(root.path(), "a");
    a.ok(&["init", "--relay", &relay.url, "--name", "alice"]);
    a.ok(&["folder", "create", "notes"]);
    let (mut daemon, mut lines) = run_daemon(&a, Stdio::null());
    assert!(lines.next().unwrap().unwrap().ends_with(" running"));
    assert!(lines.next().unwrap().unwrap().starts_with("local API on "));
    a.ok(&["put", "notes", "n1", "kept"]);
    drop(lines);
    let killed =
        std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = daemon.wait().unwrap();
    assert!(status.success(), "SIGTERM with stdout closed: {status:?}");
    assert!(!a.dir.join("api.json").exists(), "api.json is removed");
    assert!(a.ok(&["ls", "notes"]).starts_with("n1\t"));
}

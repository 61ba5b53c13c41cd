//! The relay binary's command line: help, a bad config file, an unusable address.

use std::process::Command;

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_feedmesh-relay"))
}

#[test]
fn help_names_the_settings() {
    let out = relay().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--data-dir",
        "--http",
        "--relay",
        "--quic",
        "--tls-cert",
        "--tls-self-signed",
        "--qad",
        "--trusted-proxy",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn the_documented_config_file_is_valid() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/deploy.md")).unwrap();
    let start = doc.find("```toml\n").expect("docs/deploy.md has a TOML example") + "```toml\n".len();
    let end = start + doc[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, &doc[start..end]).unwrap();
    let cfg = relay::Config::from_file(&path).unwrap();
    assert_eq!(cfg.trusted_proxies, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
    assert_eq!(cfg.limits.tokens_per_account, 32);
    // Every limit is documented, with its default.
    let documented: toml::Table = toml::from_str(&doc[start..end]).unwrap();
    let defaults = toml::Table::try_from(relay::Limits::default()).unwrap();
    assert_eq!(documented["limits"].as_table(), Some(&defaults), "[limits] in docs/deploy.md");
}

#[test]
fn a_bad_config_file_is_a_usage_error_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, "http = \"127.0.0.1:1\"\nno_such_key = 3\n").unwrap();
    let out = relay().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("relay.toml") && err.contains("no_such_key"), "{err}");
}

#[test]
fn an_address_in_use_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = relay()
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--http", &format!("127.0.0.1:{port}"), "--relay", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("binding HTTP"), "{err}");
}

/// Issue 13, item 5: a second relay on a data directory in use fails at once with a clear
/// message, and SIGTERM stops a relay as cleanly as Ctrl-C (it says so, and lets go of the
/// directory: another relay can start on it right after).
#[test]
fn a_second_relay_on_one_directory_fails_at_once_and_sigterm_stops_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        relay()
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .args(["--http", "127.0.0.1:0", "--relay", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = start();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let up = lines.next().unwrap().unwrap();
    assert_eq!(up, "feedmesh-relay is up");

    let t0 = std::time::Instant::now();
    let second = start().wait_with_output().unwrap();
    assert!(t0.elapsed() < std::time::Duration::from_secs(1), "refused at once: {:?}", t0.elapsed());
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8(second.stderr).unwrap();
    assert!(err.contains("another feedmesh-relay is running on"), "{err}");

    let killed = Command::new("kill").args(["-TERM", &first.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(first.wait().unwrap().success(), "SIGTERM is a clean stop: {rest:?}");
    assert!(rest.iter().any(|l| l == "feedmesh-relay: SIGTERM: stopping"), "{rest:?}");
    assert_eq!(rest.last().map(String::as_str), Some("feedmesh-relay: stopped"));
    // The directory is free again.
    relay::lock_data_dir(dir.path()).expect("the lock was released");
}

/// A relay whose stdout nobody reads any more (the terminal or supervisor that started it went
/// away) still stops cleanly on SIGTERM: its status lines are dropped instead of panicking on the
/// closed pipe, which skipped the clean stop (found while profiling the idle-devices benchmark).
#[test]
fn a_relay_whose_stdout_was_closed_stops_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = relay()
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--http", "127.0.0.1:0", "--relay", "127.0.0.1:0", "--quic", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(relay.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "feedmesh-relay is up");
    // Read up to the last start-up line, then let go of the pipe.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("  devices join with:") {
            break;
        }
    }
    drop(lines);
    let killed = Command::new("kill").args(["-TERM", &relay.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = relay.wait().unwrap();
    assert!(status.success(), "SIGTERM with stdout closed: {status:?}");
    relay::lock_data_dir(dir.path()).expect("the lock was released");
}

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

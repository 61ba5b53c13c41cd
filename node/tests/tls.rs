//! A relay with a self-signed certificate (local use) and two devices that reach everything,
//! the cloud included, only through it (`run --relay-only`: no UDP at all). The devices trust
//! the certificate because `init --relay-ca` pinned it.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn relayed_only_over_self_signed_tls_converges() {
    let relay = Relay::start_with(|cfg| cfg.tls_self_signed = vec!["127.0.0.1".into(), "localhost".into()]);
    let running = relay.running.as_ref().unwrap();
    assert!(running.relay_url.as_str().starts_with("https://"));
    // With TLS the relay also runs QUIC address discovery, and tells devices where.
    let qad = running.qad_addr.expect("address discovery runs with TLS");
    assert_eq!(running.connect_info().qad_port, Some(qad.port()));
    let ca = relay._dir.path().join("relay-cert.pem");
    let ca = ca.to_str().unwrap();
    let root = tempfile::tempdir().unwrap();
    let (mut a1, mut b1) = (Dev::new(root.path(), "a1"), Dev::new(root.path(), "b1"));
    a1.ok(&["init", "--relay", &relay.url, "--relay-ca", ca, "--name", "alice"]);
    b1.ok(&["init", "--relay", &relay.url, "--relay-ca", ca, "--name", "bob"]);
    a1.start_args(&["--relay-only"]);
    b1.start_args(&["--relay-only"]);
    a1.ok(&["folder", "create", "docs"]);
    a1.ok_eventually(&["folder", "share", "docs", "bob"], Duration::from_secs(60));
    b1.ok_eventually(&["folder", "accept", "docs"], Duration::from_secs(60));
    a1.ok(&["put", "docs", "from-a", "a"]);
    b1.ok(&["put", "docs", "from-b", "b"]);
    wait_for_showing(
        Duration::from_secs(60),
        || {
            let (a, b) = (ids(&a1, "docs"), ids(&b1, "docs"));
            a.len() == 2 && a == b
        },
        "both items on both devices",
        || format!("{}\n{}", a1.ok(&["status"]), b1.ok(&["status"])),
    );
    // Peer traffic, if any, went through the relay: there is no other path.
    let status = a1.ok(&["status"]);
    assert!(
        status.contains(" relayed: relay-only")
            && !status.contains(" direct: ")
            && !status.contains(" lan: "),
        "{status}"
    );
}

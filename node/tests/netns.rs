//! Two nodes, each behind its own Linux NAT (nftables masquerade), and a relay in a "public"
//! network, all in network namespaces this test makes. The nodes converge, then punch a hole
//! through both NATs: `status` shows a direct path to the other NAT's public address.
//!
//! Each router is what a home router is: masquerade plus a stateful firewall that drops new
//! connections from outside. The firewall matters: without it, a peer's probe that arrives
//! before our own has gone out is delivered to the router itself and leaves a conntrack entry
//! behind, so our probe then leaves on another port and the hole never opens (we saw exactly
//! that: both sides probing the right addresses, nothing answered, the path stayed relayed).
//!
//! Slow and needs root, `ip` and `nft`: it runs only with `FEEDMESH_NETNS_TEST=1`, e.g.
//! `FEEDMESH_NETNS_TEST=1 cargo test -p feedmesh-node --test netns -- --nocapture`
//! (the relay binary must be built: `cargo build -p feedmesh-relay`, which
//! `cargo test --workspace` does).
//!
//! ```text
//!   fmx-h1 (192.168.51.2) -- fmx-r1 [masquerade] 10.99.0.2 --+
//!                                                          br0 10.99.0.0/24 -- relay 10.99.0.1 (fmx-pub)
//!   fmx-h2 (192.168.52.2) -- fmx-r2 [masquerade] 10.99.0.3 --+
//! ```

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const NAMESPACES: [&str; 5] = ["fmx-pub", "fmx-r1", "fmx-h1", "fmx-r2", "fmx-h2"];

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn nft(ns: &str, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "nft in {ns}");
}

/// The namespaces; deleted on drop.
struct Net;

impl Net {
    fn build() -> Self {
        for ns in NAMESPACES {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        sh(&["ip", "-n", "fmx-pub", "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", "fmx-pub", "addr", "add", "10.99.0.1/24", "dev", "br0"]);
        sh(&["ip", "-n", "fmx-pub", "link", "set", "br0", "up"]);
        for (i, public, lan) in [(1, "10.99.0.2/24", "192.168.51"), (2, "10.99.0.3/24", "192.168.52")] {
            let (r, h) = (format!("fmx-r{i}"), format!("fmx-h{i}"));
            let (rp, pr) = (format!("fmx-r{i}p"), format!("fmx-p{i}"));
            sh(&["ip", "link", "add", &rp, "type", "veth", "peer", "name", &pr]);
            sh(&["ip", "link", "set", &rp, "netns", &r]);
            sh(&["ip", "link", "set", &pr, "netns", "fmx-pub"]);
            sh(&["ip", "-n", "fmx-pub", "link", "set", &pr, "master", "br0"]);
            sh(&["ip", "-n", "fmx-pub", "link", "set", &pr, "up"]);
            sh(&["ip", "-n", &r, "addr", "add", public, "dev", &rp]);
            sh(&["ip", "-n", &r, "link", "set", &rp, "up"]);
            let (rh, hr) = (format!("fmx-r{i}h"), format!("fmx-h{i}r"));
            sh(&["ip", "link", "add", &rh, "type", "veth", "peer", "name", &hr]);
            sh(&["ip", "link", "set", &rh, "netns", &r]);
            sh(&["ip", "link", "set", &hr, "netns", &h]);
            sh(&["ip", "-n", &r, "addr", "add", &format!("{lan}.1/24"), "dev", &rh]);
            sh(&["ip", "-n", &r, "link", "set", &rh, "up"]);
            sh(&["ip", "-n", &h, "addr", "add", &format!("{lan}.2/24"), "dev", &hr]);
            sh(&["ip", "-n", &h, "link", "set", &hr, "up"]);
            sh(&["ip", "-n", &h, "route", "add", "default", "via", &format!("{lan}.1")]);
            sh(&["ip", "netns", "exec", &r, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            nft(
                &r,
                &format!(
                    "table ip nat {{\n chain post {{\n  type nat hook postrouting priority 100;\n  oifname \"{rp}\" masquerade\n }}\n}}\n\
                     table inet fw {{\n chain input {{\n  type filter hook input priority 0;\n  iifname \"{rp}\" ct state new drop\n }}\n\
                     chain forward {{\n  type filter hook forward priority 0;\n  iifname \"{rp}\" ct state new drop\n }}\n}}\n"
                ),
            );
        }
        Net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in NAMESPACES {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_nodes_behind_nats_converge_through_a_public_relay() {
    if std::env::var_os("FEEDMESH_NETNS_TEST").is_none() {
        eprintln!("skipped: set FEEDMESH_NETNS_TEST=1 to run (needs root, ip and nft)");
        return;
    }
    let relay_bin = std::path::Path::new(bin()).with_file_name("feedmesh-relay");
    assert!(relay_bin.exists(), "{} is missing: run `cargo build -p feedmesh-relay`", relay_bin.display());
    let _net = Net::build();
    let root = tempfile::tempdir().unwrap();
    let _relay = Proc(
        Command::new("ip")
            .args(["netns", "exec", "fmx-pub"])
            .arg(&relay_bin)
            .arg("--data-dir")
            .arg(root.path().join("relay"))
            .args(["--http", "10.99.0.1:8080", "--relay", "10.99.0.1:3340", "--quic", "10.99.0.1:4433"])
            // TLS, so the relay also runs QUIC address discovery (10.99.0.1:7842): behind a NAT
            // that is how a device learns the public address hole punching needs.
            .args(["--tls-self-signed", "10.99.0.1"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut a1 = Dev::new(root.path(), "a1");
    a1.ns = Some("fmx-h1".into());
    let mut b1 = Dev::new(root.path(), "b1");
    b1.ns = Some("fmx-h2".into());
    let url = "http://10.99.0.1:8080";
    let ca = root.path().join("relay").join("relay-cert.pem");
    let ca = ca.to_str().unwrap();
    a1.ok_eventually(&["init", "--relay", url, "--relay-ca", ca, "--name", "alice"], Duration::from_secs(30));
    b1.ok(&["init", "--relay", url, "--relay-ca", ca, "--name", "bob"]);
    a1.start();
    b1.start();
    a1.ok(&["folder", "create", "shared"]);
    a1.ok_eventually(&["folder", "share", "shared", "bob"], Duration::from_secs(60));
    b1.ok_eventually(&["folder", "accept", "shared"], Duration::from_secs(60));
    for i in 0..20 {
        a1.ok(&["put", "shared", &format!("a{i}"), "from behind NAT 1"]);
        b1.ok(&["put", "shared", &format!("b{i}"), "from behind NAT 2"]);
    }
    wait_for_showing(
        Duration::from_secs(120),
        || {
            let (a, b) = (ids(&a1, "shared"), ids(&b1, "shared"));
            a.len() == 40 && a == b
        },
        "40 items on both sides",
        || format!("{}\n{}", a1.ok(&["status"]), b1.ok(&["status"])),
    );
    // Then the path: the relay's address discovery told each device its NAT's public address,
    // and both NATs let the other's probes in once their own went out: hole punched.
    let mut more = 0;
    wait_for_showing(
        Duration::from_secs(60),
        || {
            more += 1;
            a1.ok(&["put", "shared", &format!("x{more}"), "keep syncing"]);
            a1.ok(&["status"]).contains(" direct: direct to 10.99.0.3:")
        },
        "a direct (hole punched) path from a1 to b1's NAT",
        || format!("{}\n{}", a1.ok(&["status"]), b1.ok(&["status"])),
    );
    eprintln!("a1 status behind its NAT:\n{}", a1.ok(&["status"]));
    wait_for_showing(
        Duration::from_secs(60),
        || ids(&a1, "shared") == ids(&b1, "shared"),
        "the later writes on both sides",
        || format!("{}\n{}", a1.ok(&["status"]), b1.ok(&["status"])),
    );
    assert_eq!(export(&a1, "shared"), export(&b1, "shared"));
}

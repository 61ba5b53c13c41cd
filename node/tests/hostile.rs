//! Bad input over the network never crashes either binary: random bytes, oversize frames, unknown
//! protocols and nonsense requests, on QUIC, raw UDP and HTTP, against the relay and a running
//! node. Afterwards both still serve and sync.

mod common;

use std::time::Duration;

use common::*;
use transport::{frame, Open, Request, Response};

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // A small xorshift: reproducible noise without a dependency.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Throws everything at the QUIC endpoint at `addr` (an unknown device).
async fn attack(addr: iroh::EndpointAddr) {
    let key = engine::signing::DeviceKey::from_bytes(&[77; 32]);
    let ep = transport::endpoint(&key, &transport::EndpointOptions::default()).await.unwrap();
    let conn = ep.connect(addr.clone(), transport::ALPN).await.expect("the handshake itself is allowed");
    // 1. Random bytes as a stream opening.
    for seed in 1..20u64 {
        if let Ok((mut send, mut recv)) = conn.open_bi().await {
            let _ = send.write_all(&random_bytes(64 + seed as usize * 37, seed)).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), recv.read_to_end(1 << 20)).await;
        }
    }
    // 2. A frame that claims 4 GiB.
    if let Ok((mut send, mut recv)) = conn.open_bi().await {
        let _ = send.write_all(&u32::MAX.to_be_bytes()).await;
        let _ = send.write_all(&[0u8; 1024]).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), recv.read_to_end(1 << 20)).await;
    }
    // 3. A frame just over the limit, actually sent.
    if let Ok((mut send, _recv)) = conn.open_bi().await {
        let n = transport::CONTROL_MAX + 1;
        let _ = send.write_all(&(n as u32).to_be_bytes()).await;
        let _ = send.write_all(&vec![0u8; 256 * 1024]).await;
        let _ = send.finish();
    }
    // 4. A sync stream with garbage after the opening, and one that opens with a non-DirHello.
    for seed in 100..105u64 {
        if let Ok((mut send, mut recv)) = conn.open_bi().await {
            let _ = frame::write_value(&mut send, &Open::Sync).await;
            let _ = frame::write(&mut send, &random_bytes(300, seed)).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), recv.read_to_end(1 << 20)).await;
        }
    }
    // 5. Control requests an unknown device may not make, and forged directory changes.
    let forged = {
        let mut dir = engine::directory::Directory::new();
        let other = engine::signing::DeviceKey::from_bytes(&[78; 32]);
        let mut change =
            dir.make(&other, 1, engine::directory::Op::CreateUser { name: "mallory".into() }).unwrap();
        change.signature.0[0] ^= 1;
        change
    };
    for request in [
        Request::Directory { heads: vec![], changes: vec![forged] },
        Request::PairList,
        Request::Account { name: "x".into(), password: "password1".into() },
        Request::PairRequest {
            account: "nobody".into(),
            password: "wrong-password".into(),
            commitment: [0; 32],
        },
        Request::Peers { folder: engine::directory::FolderId([1; 16]) },
    ] {
        if let Ok((mut send, mut recv)) = conn.open_bi().await {
            let _ = frame::write_value(&mut send, &Open::Control(request)).await;
            let _ = send.finish();
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                frame::read_value::<Response>(&mut recv, 1 << 20, "r"),
            )
            .await;
            if let Ok(Ok(Some(r))) = answer {
                assert!(
                    matches!(r, Response::Refused(_)),
                    "a refused request must answer with an error: {r:?}"
                );
            }
        }
    }
    // 6. Many streams at once, abandoned.
    for _ in 0..50 {
        if let Ok((mut send, _)) = conn.open_bi().await {
            let _ = send.write_all(&[0, 0, 0, 9, 1]).await;
        }
    }
    conn.close(0u32.into(), b"done");
    // 7. An unknown ALPN is refused at the handshake.
    let other = iroh::Endpoint::builder(iroh::endpoint::presets::Minimal)
        .alpns(vec![b"not-feedmesh".to_vec()])
        .relay_mode(iroh::RelayMode::Disabled)
        .bind()
        .await
        .unwrap();
    let refused =
        tokio::time::timeout(Duration::from_secs(5), other.connect(addr.clone(), b"not-feedmesh")).await;
    assert!(!matches!(refused, Ok(Ok(_))), "an unknown protocol must not be accepted");
    other.close().await;
    ep.close().await;
    // 8. Raw UDP noise at every direct address.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for a in addr.ip_addrs() {
        for seed in 1..200u64 {
            let _ = udp.send_to(&random_bytes((seed as usize * 13) % 1400 + 1, seed), a);
        }
    }
}

#[test]
fn bad_input_crashes_neither_the_relay_nor_a_node() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let relay = Relay::start();
    let root = tempfile::tempdir().unwrap();
    let mut a1 = Dev::new(root.path(), "a1");
    a1.ok(&["init", "--relay", &relay.url, "--name", "alice"]);
    a1.ok(&["folder", "create", "f"]);
    a1.ok(&["put", "f", "before", "x"]);
    a1.start();
    let a1_device = node::state::Node::open(&a1.dir).map(|n| n.id);
    assert!(a1_device.is_err(), "the daemon holds the database");
    // The node's address, from the cloud's address book.
    let node_addr = {
        let mut found = None;
        wait_for(
            Duration::from_secs(30),
            || {
                found = relay.cloud().lock().control.addresses().next().and_then(transport::endpoint_addr);
                found.is_some()
            },
            "the node to announce its address",
        );
        found.unwrap()
    };
    let cloud_addr = {
        let info = relay.running.as_ref().unwrap().connect_info();
        let id =
            iroh::EndpointId::from_bytes(&engine::signing::unhex(&info.cloud).unwrap().try_into().unwrap())
                .unwrap();
        iroh::EndpointAddr::from_parts(id, info.addrs.iter().map(|a| iroh::TransportAddr::Ip(*a)))
    };
    relay.rt.block_on(async {
        attack(cloud_addr).await;
        attack(node_addr).await;
    });

    // HTTP nonsense to the relay.
    relay.rt.block_on(async {
        let c = reqwest::Client::new();
        let url = &relay.url;
        let r = c
            .post(format!("{url}/v1/login"))
            .body("{not json")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error());
        let r = c
            .post(format!("{url}/v1/login"))
            .json(&serde_json::json!({"account": "a", "password": "b"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let r = c.get(format!("{url}/v1/folders")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let admin = relay.admin_token();
        for path in [
            "/v1/folders/zz",
            "/v1/folders/00/items",
            "/v1/users/123",
            "/v1/folders/0123456789abcdef0123456789abcdef/items/%00",
        ] {
            let r = c.get(format!("{url}{path}")).bearer_auth(&admin).send().await.unwrap();
            assert!(r.status().is_client_error(), "{path}: {}", r.status());
        }
        let r = c
            .post(format!("{url}/v1/folders/0123456789abcdef0123456789abcdef/feed"))
            .bearer_auth(&admin)
            .body(random_bytes(5000, 9))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error());
        // One byte over the limit: the relay has to read the whole body before it can refuse it,
        // so no unread bytes are left to turn its close into a reset while we are still sending.
        // (A much larger body raced: the 413 went out and the socket closed under our write.)
        let r = c
            .post(format!("{url}/v1/login"))
            .header("content-type", "application/json")
            .body(vec![b'x'; relay::http::BODY_MAX + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "an oversize body is refused");
        // Raw garbage on the HTTP port.
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(relay.running.as_ref().unwrap().http_addr).await.unwrap();
        let _ = s.write_all(&random_bytes(10_000, 4)).await;
        drop(s);
    });

    // HTTP nonsense to the node's local API.
    let (base, token) = a1.api();
    relay.rt.block_on(async {
        let c = reqwest::Client::new();
        let r = c.get(format!("{base}/v1/status")).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = c
            .post(format!("{base}/v1/exec"))
            .bearer_auth(&token)
            .body("[1,2")
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error());
        let r = c
            .put(format!("{base}/v1/folders/nope/items/x"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"text": "t"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "no such folder is a typed not-found (issue 13)");
        let r = c
            .put(format!("{base}/v1/folders/f/items/bad%20id"))
            .bearer_auth(&token)
            .json(&serde_json::json!({"text": "t"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    });

    // Both still work: the node is alive, takes a write and syncs it to the cloud.
    assert!(a1.daemon.as_mut().unwrap().try_wait().unwrap().is_none(), "the node process is alive");
    a1.ok(&["put", "f", "after", "y"]);
    a1.ok(&["sync"]);
    relay.rt.block_on(async {
        let r = reqwest::get(format!("{}/health", relay.url)).await.unwrap();
        assert_eq!(r.status(), 200);
    });
    let cloud_items: usize = relay.cloud().lock().replicas.values().map(|r| r.len()).sum();
    assert_eq!(cloud_items, 2);
}

//! Issue 11, defect 9: every QUIC connection by a new key left about 25 KiB of iroh state
//! behind for a minute, so connect/close churn from one address held memory in proportion to its
//! rate without bound. Handshakes now pass a gate first: a burst, then a rate, per source
//! address (and in total, and a cap on open connections); the rest are refused before any
//! handshake work.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use engine::signing::DeviceKey;
use iroh::{EndpointAddr, TransportAddr};
use support::Relay;
use transport::{EndpointOptions, ALPN};

#[test]
fn handshakes_from_one_address_get_a_burst_then_are_refused() {
    let limits = relay::Limits {
        quic_handshake_burst: 3,
        // No refill, so the count does not depend on how fast the attempts run.
        quic_handshakes_per_second: 0,
        ..relay::Limits::default()
    };
    let relay = Relay::start(limits);
    let running = relay.running();
    let cloud = EndpointAddr::from_parts(
        running.endpoint.id(),
        running.endpoint.bound_sockets().into_iter().map(TransportAddr::Ip),
    );
    let connected = relay.rt.block_on(async {
        let mut connected = 0;
        for seed in 0..6u8 {
            let key = DeviceKey::from_bytes(&[100 + seed; 32]);
            let opts =
                EndpointOptions { bind: Some(SocketAddr::from(([127, 0, 0, 1], 0))), ..Default::default() };
            let ep = transport::endpoint(&key, &opts).await.unwrap();
            // A refused handshake fails at once; a bounded wait covers a lost packet.
            let got = tokio::time::timeout(Duration::from_secs(10), ep.connect(cloud.clone(), ALPN)).await;
            if let Ok(Ok(conn)) = got {
                connected += 1;
                conn.close(0u32.into(), b"bye");
            }
            ep.close().await;
        }
        connected
    });
    assert_eq!(connected, 3, "the burst, then nothing");
    let metrics = running.cloud.metrics.render(0);
    let refused = metrics
        .lines()
        .find(|l| l.contains("quic-handshake-rate\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(refused as usize, 6 - connected, "{metrics}");
}

//! The cloud endpoint's accept loop, and the gate every QUIC handshake passes first.
//!
//! A connection from a key the endpoint has not seen leaves iroh's per-remote state (its
//! `RemoteStateActor`, the connection's packet spaces and channels: about 25 KiB, measured with
//! `benches/src/bin/relay_churn.rs`) alive for 60 s after it closes; the actor then stops and the
//! memory is freed. So connect/close churn with new keys holds memory in proportion to its rate
//! (issue 11, defect 9: 18 KB per cycle, seen as resident memory that glibc's allocator then kept;
//! the relay binary now uses jemalloc, which returns freed pages). The gate bounds that rate per
//! source address and in total, and the number of open connections, before any handshake work.

use std::net::IpAddr;
use std::sync::Arc;

use engine::sync::Micros;
use iroh::endpoint::IncomingAddr;

use crate::cloud::{Cloud, Limits};
use crate::limit::Buckets;
use crate::metrics::Reason;

/// Most source addresses whose handshake buckets are tracked at once.
const ADDRESSES_TRACKED_MAX: usize = 1 << 16;

/// Why a handshake is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The source address started more handshakes than its bucket allows.
    AddressRate,
    /// All sources together did.
    TotalRate,
    /// `quic_connections_max` connections are open.
    Connections,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::AddressRate => "quic-handshake-rate",
            Refused::TotalRate => "quic-handshake-rate-total",
            Refused::Connections => "quic-connections",
        }
    }
}

/// Handshake admission: token buckets per source (`None`: through the relay server) and in total.
/// Owned by the accept loop alone, so no lock.
#[derive(Debug)]
pub struct Gate {
    per_address: Buckets<Option<IpAddr>>,
    total: Buckets<()>,
    connections_max: usize,
}

impl Gate {
    pub fn new(limits: &Limits) -> Self {
        Self {
            per_address: Buckets::new(
                f64::from(limits.quic_handshakes_per_second),
                f64::from(limits.quic_handshake_burst),
                ADDRESSES_TRACKED_MAX,
            ),
            total: Buckets::new(
                f64::from(limits.quic_handshakes_per_second_total),
                f64::from(limits.quic_handshakes_per_second_total),
                1,
            ),
            connections_max: limits.quic_connections_max,
        }
    }

    /// Whether a handshake from `source` may start at `now_us`, with `open` connections now.
    pub fn admit(&mut self, source: Option<IpAddr>, open: usize, now_us: Micros) -> Result<(), Refused> {
        if open >= self.connections_max {
            return Err(Refused::Connections);
        }
        self.per_address.take(&source, now_us).map_err(|_| Refused::AddressRate)?;
        self.total.take(&(), now_us).map_err(|_| Refused::TotalRate)
    }
}

/// Accepts connections to the cloud endpoint until it closes; each admitted one is served by
/// [`Cloud::serve`] on its own task.
pub async fn accept(endpoint: iroh::Endpoint, cloud: Arc<Cloud>) {
    let mut gate = Gate::new(&cloud.limits);
    while let Some(incoming) = endpoint.accept().await {
        let source = match incoming.remote_addr() {
            IncomingAddr::Ip(addr) => Some(addr.ip()),
            _ => None,
        };
        let open = usize::try_from(cloud.metrics.connections.get()).unwrap_or(0);
        if let Err(why) = gate.admit(source, open, transport::now_us()) {
            cloud.metrics.refusals.get_or_create(&Reason::new(why.reason())).inc();
            incoming.refuse();
            continue;
        }
        let cloud = cloud.clone();
        tokio::spawn(async move {
            let Ok(accepting) = incoming.accept() else { return };
            match accepting.await {
                Ok(conn) => cloud.serve(conn).await,
                Err(e) => tracing::debug!(error = %e, "handshake failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            quic_handshakes_per_second: 1,
            quic_handshake_burst: 3,
            quic_handshakes_per_second_total: 5,
            quic_connections_max: 10,
            ..Limits::default()
        }
    }

    #[test]
    fn each_address_has_a_burst_then_its_rate() {
        let mut gate = Gate::new(&limits());
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..3 {
            assert_eq!(gate.admit(a, 0, 0), Ok(()));
        }
        assert_eq!(gate.admit(a, 0, 0), Err(Refused::AddressRate));
        assert_eq!(gate.admit(a, 0, 1_000_000), Ok(()), "one a second");
    }

    #[test]
    fn many_addresses_meet_the_total_and_open_connections_the_cap() {
        let mut gate = Gate::new(&limits());
        for i in 0..5u8 {
            assert_eq!(gate.admit(Some(IpAddr::from([10, 0, 0, i])), 0, 0), Ok(()));
        }
        assert_eq!(gate.admit(Some(IpAddr::from([10, 0, 1, 0])), 0, 0), Err(Refused::TotalRate));
        assert_eq!(gate.admit(None, 10, 2_000_000), Err(Refused::Connections));
        assert_eq!(gate.admit(None, 9, 2_000_000), Ok(()), "relayed handshakes share one bucket");
    }
}

//! Prometheus metrics (`GET /metrics`, text exposition format).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A label naming a kind or reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub kind: String,
}

impl Reason {
    pub fn new(kind: &str) -> Self {
        Self { kind: kind.to_string() }
    }
}

/// Every metric the relay exports.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub connections: Gauge,
    pub frames_received: Counter,
    pub frames_sent: Counter,
    pub sessions: Family<Reason, Counter>,
    pub requests: Family<Reason, Counter>,
    pub refusals: Family<Reason, Counter>,
    pub http_requests: Family<Reason, Counter>,
    pub tickets_issued: Counter,
    pub directory_changes: Counter,
    pub items_stored: Counter,
    pub notices_sent: Counter,
    pub long_polls: Gauge,
    pub http_connections: Gauge,
    pub content_groups_stored: Counter,
    pub content_groups_served: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text exposition of every metric.
    pub fn render(&self, relay_clients: i64) -> String {
        let mut registry = Registry::with_prefix("feedmesh");
        registry.register(
            "connections",
            "Open device connections to the cloud endpoint",
            self.connections.clone(),
        );
        registry.register("frames_received", "Sync frames received", self.frames_received.clone());
        registry.register("frames_sent", "Sync frames sent", self.frames_sent.clone());
        registry.register("sessions", "Sync sessions by outcome", self.sessions.clone());
        registry.register("requests", "Control requests by kind", self.requests.clone());
        registry.register("refusals", "Refused connections and sessions by reason", self.refusals.clone());
        registry.register("http_requests", "HTTP API requests by route", self.http_requests.clone());
        registry.register("tickets_issued", "Tickets issued", self.tickets_issued.clone());
        registry.register("directory_changes", "Directory changes accepted", self.directory_changes.clone());
        registry.register("items_stored", "Item versions written to storage", self.items_stored.clone());
        registry.register("notices_sent", "Change notices pushed to devices", self.notices_sent.clone());
        registry.register("long_polls", "Long-poll requests waiting", self.long_polls.clone());
        registry.register("http_connections", "Open HTTP API connections", self.http_connections.clone());
        registry.register(
            "content_groups_stored",
            "Sealed chunk groups of cloud folders stored",
            self.content_groups_stored.clone(),
        );
        registry.register(
            "content_groups_served",
            "Sealed chunk groups served from the cloud's copy",
            self.content_groups_served.clone(),
        );
        let relay = Gauge::<i64>::default();
        relay.set(relay_clients);
        registry.register("relay_clients", "Endpoints connected to the embedded iroh relay", relay);
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

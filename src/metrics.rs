//! Prometheus metrics, served at `GET /metrics` in the OpenMetrics text
//! format. Every counter is a cheap handle (an `Arc` of an atomic), so the
//! parts that count keep their own clones.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::admission::AdmissionMetrics;
use crate::broker::{Broker, Count};
use crate::store::StoreMetrics;
use crate::webhook::WebhookMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

type HistogramFamily = prometheus_client::metrics::family::Family<
    TransportLabel,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

/// Time from an event's acceptance (its `timestamp`, stamped by the
/// instance that accepted it, to the millisecond) to its emission, by
/// transport: live events only, not replays. On another instance it
/// includes the relay through Redis (and the clocks' difference).
#[derive(Clone, Debug)]
pub struct EmitLatency {
    family: HistogramFamily,
    socketio: prometheus_client::metrics::histogram::Histogram,
    grpc: prometheus_client::metrics::histogram::Histogram,
}

impl Default for EmitLatency {
    fn default() -> Self {
        let family = HistogramFamily::new_with_constructor(|| {
            prometheus_client::metrics::histogram::Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
        });
        let of = |transport| family.get_or_create(&TransportLabel { transport }).clone();
        Self {
            socketio: of("socketio"),
            grpc: of("grpc"),
            family,
        }
    }
}

impl EmitLatency {
    fn observe(histogram: &prometheus_client::metrics::histogram::Histogram, timestamp: &str) {
        let Some(at) = crate::clock::parse_timestamp(timestamp) else {
            return;
        };
        let seconds = std::time::SystemTime::now()
            .duration_since(at)
            .map_or(0.0, |d| d.as_secs_f64());
        histogram.observe(seconds);
    }

    /// An event emitted to a tenant's Socket.IO sockets.
    pub fn socketio(&self, timestamp: &str) {
        Self::observe(&self.socketio, timestamp);
    }

    /// A batch of events written to a gRPC subscriber (its oldest event).
    pub fn grpc(&self, timestamp: &str) {
        Self::observe(&self.grpc, timestamp);
    }
}

/// Counters of the Socket.IO edge.
#[derive(Clone, Debug, Default)]
pub struct EdgeMetrics {
    /// Sockets connected now.
    pub sockets: Gauge,
    /// Handshakes refused (bad token, origin, membership, …).
    pub handshakes_refused: Counter,
    /// Events emitted to sockets (one per socket per event).
    pub events_sent: Counter,
    /// Events replayed to reconnecting sockets.
    pub events_replayed: Counter,
    /// Events that waited for their tenant's rate limit.
    pub rate_delayed: Counter,
    /// Events dropped because their tenant's rate-limit queue was full.
    pub rate_dropped: Counter,
    /// Sockets disconnected because they could not keep up.
    pub slow_sockets: Counter,
    /// Sockets disconnected because their token expired.
    pub expired_sockets: Counter,
    /// Tokens refreshed on open sockets.
    pub token_refreshes: Counter,
    /// Per-tenant pumps that failed (their sockets were disconnected).
    pub pump_failures: Counter,
    /// Publish-to-emit latency, both transports.
    pub emit_latency: EmitLatency,
    /// Spans of emits, when OTLP export is on.
    pub tracer: crate::otlp::Tracer,
}

/// The registry behind `/metrics`.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Adds the TLS counters (when TLS is on).
    pub fn register_otlp(&mut self, otlp: &crate::otlp::OtlpMetrics) {
        otlp.register(&mut self.registry);
    }

    pub fn register_tls(&mut self, tls: &crate::tls::TlsMetrics) {
        self.registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by listener (a plain-text client on a TLS port, an unknown CA, no client certificate under TC_TLS_CLIENT_CA)",
            tls.handshake_failures.clone(),
        );
        self.registry.register(
            "tls_reloads",
            "Reloads of the TLS certificate files, by outcome (loaded, failed: the previous certificate stays)",
            tls.reloads.clone(),
        );
    }

    pub fn new(
        broker: &Broker,
        edge: &EdgeMetrics,
        store: Option<&StoreMetrics>,
        admission: &AdmissionMetrics,
        webhooks: &WebhookMetrics,
        projections: &crate::projection::Projections,
        policies: &crate::policy::Policies,
    ) -> Self {
        let mut registry = Registry::with_prefix("tc");
        projections.register_metrics(&mut registry);
        policies.register_metrics(&mut registry);
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by outcome (succeeded, failed, refused by the destination guard, gone)",
            webhooks.attempts.clone(),
        );
        registry.register(
            "webhook_attempt_seconds",
            "Time from sending a webhook to its answer",
            webhooks.latency.clone(),
        );
        registry.register(
            "webhook_pending",
            "Webhook deliveries waiting, counting those in flight (every instance's, with Redis)",
            webhooks.pending.clone(),
        );
        registry.register(
            "webhook_in_flight",
            "Webhook deliveries in flight on this instance",
            webhooks.in_flight.clone(),
        );
        registry.register(
            "webhook_endpoints_disabled",
            "Webhook endpoints disabled now",
            webhooks.disabled.clone(),
        );
        registry.register(
            "webhook_given_up",
            "Webhook deliveries given up (schedule exhausted, endpoint gone or disabled, pending limit)",
            webhooks.given_up.clone(),
        );
        registry.register(
            "webhook_dropped",
            "Events not handed to webhooks because TC_WEBHOOK_QUEUE was full",
            webhooks.dropped.clone(),
        );
        if let Some(store) = store {
            registry.register("redis_up", "1 while Redis answers", store.up.clone());
            registry.register(
                "redis_buffered",
                "Events accepted here and waiting to be written to Redis",
                store.buffered.clone(),
            );
            registry.register(
                "redis_written",
                "Events written to Redis",
                store.written.clone(),
            );
            registry.register(
                "redis_lost",
                "Events delivered locally but never written to Redis (buffer full): lost to other instances",
                store.lost.clone(),
            );
            registry.register(
                "redis_write_errors",
                "Failed Redis write rounds (each is retried)",
                store.write_errors.clone(),
            );
            registry.register(
                "redis_relayed",
                "Events read from Redis that other instances wrote and delivered here",
                store.relayed.clone(),
            );
            registry.register(
                "redis_invalid",
                "Stream entries read from Redis and skipped: not an event that follows the rules",
                store.invalid.clone(),
            );
            registry.register(
                "redis_own_passed",
                "This instance's own Redis entries its relays passed over without reading them back",
                store.own_passed.clone(),
            );
            registry.register(
                "redis_skipped_keys",
                "Redis keys skipped because they hold something else than a stream",
                store.skipped_keys.clone(),
            );
            registry.register(
                "redis_relay_lag_ms",
                "Milliseconds between a Redis entry's append and its relay here (last entry)",
                store.relay_lag_ms.clone(),
            );
        }
        registry.register_collector(Box::new(BrokerCollector(broker.clone())));
        registry.register(
            "connections_open",
            "Connections open now, gRPC and HTTP together",
            admission.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at once because TC_MAX_CONNECTIONS or TC_MAX_CONNECTIONS_PER_IP was reached",
            admission.refused.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts (out of file descriptors and the like)",
            admission.accept_errors.clone(),
        );
        registry.register(
            "socketio_sockets",
            "Socket.IO sockets connected",
            edge.sockets.clone(),
        );
        registry.register(
            "socketio_handshakes_refused",
            "Socket.IO handshakes refused",
            edge.handshakes_refused.clone(),
        );
        registry.register(
            "socketio_events_sent",
            "Events emitted to Socket.IO sockets",
            edge.events_sent.clone(),
        );
        registry.register(
            "socketio_events_replayed",
            "Events replayed to reconnecting Socket.IO sockets",
            edge.events_replayed.clone(),
        );
        registry.register(
            "socketio_rate_delayed",
            "Events that waited for their tenant's emit rate limit",
            edge.rate_delayed.clone(),
        );
        registry.register(
            "socketio_rate_dropped",
            "Events dropped because their tenant's rate-limit queue was full",
            edge.rate_dropped.clone(),
        );
        registry.register(
            "socketio_slow_sockets",
            "Sockets disconnected because they could not keep up",
            edge.slow_sockets.clone(),
        );
        registry.register(
            "socketio_expired_sockets",
            "Sockets disconnected because their token expired",
            edge.expired_sockets.clone(),
        );
        registry.register(
            "socketio_pump_failures",
            "Per-tenant Socket.IO pumps that failed; their sockets were disconnected to resume",
            edge.pump_failures.clone(),
        );
        registry.register(
            "publish_to_emit_seconds",
            "Time from an event's acceptance stamp to its emission to subscribers, by transport (socketio: per event and tenant; grpc: per batch written, its oldest event); live events only",
            edge.emit_latency.family.clone(),
        );
        registry.register(
            "socketio_token_refreshes",
            "Tokens refreshed on open sockets",
            edge.token_refreshes.clone(),
        );
        Self { registry }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The broker's counts, read at each scrape (the broker does not know this
/// library).
struct BrokerCollector(Broker);

impl std::fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerCollector")
    }
}

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = self.0.stats();
        let counts: [(&str, &str, &Count); 5] = [
            (
                "events_published",
                "Events accepted and dispatched",
                &stats.published,
            ),
            (
                "events_duplicate",
                "Publishes of an id recently dispatched: acknowledged, not delivered",
                &stats.duplicates,
            ),
            (
                "events_delivered",
                "Events handed to in-process subscribers",
                &stats.delivered,
            ),
            (
                "slow_subscribers_dropped",
                "gRPC and internal subscribers dropped because their buffer was full",
                &stats.slow_subscribers_dropped,
            ),
            (
                "events_relayed",
                "Events accepted by other instances and delivered here",
                &stats.relayed,
            ),
        ];
        for (name, help, count) in counts {
            let counter = ConstCounter::new(count.get());
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let open = prometheus_client::metrics::gauge::ConstGauge::new(
            i64::try_from(self.0.subscriber_count()).unwrap_or(i64::MAX),
        );
        let metric = encoder.encode_descriptor(
            "subscribers",
            "Broker subscriptions open: gRPC Subscribe streams and MCP resource followers (sockets are counted in sockets)",
            None,
            open.metric_type(),
        )?;
        open.encode(metric)?;
        Ok(())
    }
}

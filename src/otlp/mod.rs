//! Traces over OTLP/gRPC (`TC_OTLP_ENDPOINT`; off by default).
//!
//! A span for each accepted publish and one for each delivery (a batch to a
//! gRPC subscriber, an event emitted to a tenant's sockets, a webhook
//! attempt). The publish span is in the event's own trace (its envelope's
//! `trace_id`), the child of the producer's `traceparent` span when the
//! publish carried one; a delivery span is the child of its (first) event's
//! publish span and links the others of its batch. A publish span's id is
//! derived from the event id ([`publish_span_id`]), so an instance that
//! delivers an event another instance accepted (through Redis) still names
//! its parent without anything being stored.
//!
//! Sampling is decided on the trace id alone (`TC_OTLP_SAMPLE_RATIO`, the
//! rule of OpenTelemetry's `TraceIdRatioBased`), so every instance keeps or
//! skips an event's publish and deliveries together.
//!
//! Spans wait in one queue bounded in bytes (`TC_OTLP_QUEUE_BYTES`); when it
//! is full new spans are dropped and counted, never waited for: a slow or
//! absent collector costs the broker nothing but those spans. One task
//! exports them in batches of up to [`BATCH`] spans, at least every
//! [`EVERY`], over the crate's own gRPC stack (tonic, rustls).
//!
//! Why not the OpenTelemetry SDK: its batch processor exports from its own
//! thread, outside the tokio runtime tonic needs, and has no byte bound;
//! the spans here need ids the broker derives itself. What is used from
//! OpenTelemetry is the protocol: `proto/opentelemetry/` (vendored).

mod export;
mod proto;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Notify;

use crate::event::Event;
use proto::common::{AnyValue, KeyValue, any_value};
use proto::trace::{Span, Status, span, status};

pub use export::Exporter;

/// Most spans in one export request.
pub const BATCH: usize = 512;
/// A span waits at most about this long before it is exported.
pub const EVERY: Duration = Duration::from_secs(1);
/// Most links of one delivery span (its batch's other events); the rest are
/// counted in the span's `dropped_links_count`.
pub const MAX_LINKS: usize = 128;
/// W3C trace flag: sampled.
const SAMPLED: u32 = 0x01;
/// OTLP span flags: whether the parent is remote is known (bit 8) and it is
/// (bit 9).
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// The OTLP settings of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct OtlpSettings {
    /// OTLP/gRPC collector to export spans to (`http://collector:4317`, or
    /// `https://` with the system's roots and TC_OTLP_CA_FILE's): a span per
    /// publish and per delivery. Unset: no spans.
    #[arg(long, env = "TC_OTLP_ENDPOINT", value_parser = endpoint)]
    pub otlp_endpoint: Option<String>,

    /// Metadata sent with every export, `key=value` pairs separated by
    /// commas (a vendor's API key). Checked at start; an error names the
    /// pair, never its value.
    #[arg(long, env = "TC_OTLP_HEADERS", hide_env_values = true)]
    pub otlp_headers: Option<String>,

    /// CA certificates (PEM) trusted for an `https://` endpoint, beside the
    /// system's.
    #[arg(long, env = "TC_OTLP_CA_FILE")]
    pub otlp_ca_file: Option<PathBuf>,

    /// Share of traces exported, 0 to 1, decided on the trace id alone (the
    /// same on every instance for an event's publish and deliveries).
    #[arg(long, env = "TC_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = ratio)]
    pub otlp_sample_ratio: f64,

    /// The `service.name` of the exported spans.
    #[arg(
        long,
        env = "TC_OTLP_SERVICE_NAME",
        default_value = "tensorcost-events"
    )]
    pub otlp_service_name: String,

    /// Most bytes of spans waiting for export; past it new spans are dropped
    /// (tc_otlp_spans_total{outcome="dropped"}).
    #[arg(long, env = "TC_OTLP_QUEUE_BYTES", default_value_t = 4 << 20, value_parser = crate::config::parse::positive)]
    pub otlp_queue_bytes: usize,

    /// Longest one export request may take (a failed one is tried twice
    /// more, then its spans are dropped).
    #[arg(long, env = "TC_OTLP_TIMEOUT", default_value = "10s", value_parser = crate::config::parse::duration)]
    pub otlp_timeout: Duration,
}

fn endpoint(value: &str) -> Result<String, String> {
    let url = url::Url::parse(value.trim())
        .map_err(|e| format!("{e}: give a URL like http://collector:4317"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("give a URL like http://collector:4317 or https://collector:4317".into());
    }
    Ok(value.trim().to_string())
}

fn ratio(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("a number from 0 to 1 (1: every trace)".into()),
    }
}

/// `key=value,key=value`, the metadata of every export request. The
/// values are secrets: an error names the pair's position and key, never
/// its value.
pub(super) fn headers(value: &str) -> Result<tonic::metadata::MetadataMap, String> {
    use tonic::metadata::{MetadataKey, MetadataValue};
    let mut map = tonic::metadata::MetadataMap::new();
    for (i, pair) in value
        .split(',')
        .enumerate()
        .filter(|(_, p)| !p.trim().is_empty())
    {
        let Some((key, val)) = pair.split_once('=') else {
            return Err(format!("pair {}: not key=value", i + 1));
        };
        let key = key.trim().to_ascii_lowercase();
        let name = MetadataKey::from_bytes(key.as_bytes())
            .map_err(|_| format!("pair {}: {key:?} is not a header name", i + 1))?;
        let val = MetadataValue::try_from(val.trim())
            .map_err(|_| format!("pair {} ({key}): the value is not a header value", i + 1))?;
        map.insert(name, val);
    }
    Ok(map)
}

/// Where a delivery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Socketio,
    Webhook,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Socketio => "socketio",
            Transport::Webhook => "webhook",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The exporter's counters (registered whether or not export is on).
#[derive(Clone, Default)]
pub struct OtlpMetrics {
    spans: Family<OutcomeLabel, Counter>,
    failures: Counter,
}

impl OtlpMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "otlp_spans",
            "Spans by outcome: exported, dropped (queue full or export failed)",
            self.spans.clone(),
        );
        registry.register(
            "otlp_export_failures",
            "OTLP export requests that failed (each is tried three times)",
            self.failures.clone(),
        );
    }

    fn count(&self, outcome: &'static str, n: usize) {
        self.spans
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(n as u64);
    }
}

/// Spans waiting for export.
#[derive(Default)]
struct Queue {
    spans: std::collections::VecDeque<(Span, usize)>,
    bytes: usize,
}

struct Inner {
    /// Highest value of a trace id's last 8 bytes shifted right by one
    /// that is sampled (`TraceIdRatioBased`).
    sample_below: u64,
    max_bytes: usize,
    queue: Mutex<Queue>,
    /// A batch is ready.
    ready: Notify,
    metrics: OtlpMetrics,
}

/// Makes spans and queues them for export. Cheap to clone; off (every call
/// returns at once) unless `TC_OTLP_ENDPOINT` is set.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

/// The event a webhook attempt delivers.
#[derive(Debug, Clone, Copy)]
pub struct Attempted<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub event_type: &'a str,
    pub trace_id: &'a str,
}

/// Publish spans between acceptance and dispatch, by the event's index.
pub struct Publishing(Vec<(usize, Span)>);

/// A webhook attempt's span, between its start and its answer.
pub struct Attempt {
    span: Option<Span>,
    /// `traceparent` for the request: the receiver's spans become children
    /// of this attempt (of the publish span when export is off).
    pub traceparent: String,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("on", &self.is_on()).finish()
    }
}

impl Tracer {
    /// A tracer that exports nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// A tracer and the exporter of what it queues, or an error naming the
    /// setting at fault.
    pub fn start(
        settings: &OtlpSettings,
        instance: &str,
        metrics: OtlpMetrics,
    ) -> anyhow::Result<Option<(Self, Exporter)>> {
        let Some(url) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let inner = Arc::new(Inner {
            // ratio 1 gives 2^63: every shifted value is below it.
            sample_below: (settings.otlp_sample_ratio * (1u64 << 63) as f64) as u64,
            max_bytes: settings.otlp_queue_bytes,
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            metrics,
        });
        let exporter = Exporter::new(url, settings, instance, Arc::clone(&inner))?;
        Ok(Some((Self { inner: Some(inner) }, exporter)))
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether spans of `trace_id` (hex) are exported; its bytes if so.
    fn sampled(&self, trace_id: &str) -> Option<(&Inner, [u8; 16])> {
        let inner = self.inner.as_deref()?;
        let bytes = trace_bytes(trace_id)?;
        let low = u64::from_be_bytes(bytes[8..].try_into().ok()?);
        ((low >> 1) < inner.sample_below).then_some((inner, bytes))
    }

    /// Publish spans for `events`, accepted at `started`, before they are
    /// dispatched; [`Tracer::published`] ends them. Empty when off.
    pub fn publishing<'a>(
        &self,
        events: impl IntoIterator<Item = &'a Event>,
        parent: (Option<&str>, Option<u64>),
        started: SystemTime,
    ) -> Publishing {
        if self.inner.is_none() {
            return Publishing(Vec::new());
        }
        let start = unix_nanos(started);
        let spans = events
            .into_iter()
            .enumerate()
            .filter_map(|(i, event)| {
                let (_, trace) = self.sampled(&event.trace_id)?;
                // The producer's span is the parent when the event is in
                // its trace (a draft may carry a trace id of its own).
                let parent_id = match parent {
                    (Some(t), Some(id)) if t == event.trace_id => Some(id),
                    _ => None,
                };
                let mut span = Span {
                    trace_id: trace.to_vec(),
                    span_id: publish_span_id(&event.id).to_be_bytes().to_vec(),
                    parent_span_id: parent_id
                        .map(|p| p.to_be_bytes().to_vec())
                        .unwrap_or_default(),
                    flags: SAMPLED
                        | HAS_IS_REMOTE
                        | if parent_id.is_some() { IS_REMOTE } else { 0 },
                    name: "publish".into(),
                    kind: span::SpanKind::Server as i32,
                    start_time_unix_nano: start,
                    ..Default::default()
                };
                span.attributes = vec![
                    text("messaging.system", "tensorcost-events"),
                    text("messaging.operation.type", "receive"),
                    text("messaging.destination.name", &event.event_type),
                    text("messaging.message.id", &event.id),
                    text("tc.tenant", &event.tenant_id),
                ];
                Some((i, span))
            })
            .collect();
        Publishing(spans)
    }

    /// Ends and queues publish spans; `duplicate(i)` says whether the i-th
    /// event was a duplicate (acknowledged, not dispatched again).
    pub fn published(&self, spans: Publishing, duplicate: impl Fn(usize) -> bool) {
        let Some(inner) = self.inner.as_deref() else {
            return;
        };
        let end = unix_nanos(SystemTime::now());
        for (i, mut span) in spans.0 {
            if duplicate(i) {
                // Its id belongs to the first publish of the event.
                span.span_id = random_span_id().to_be_bytes().to_vec();
                span.attributes.push(boolean("tc.duplicate", true));
            }
            span.end_time_unix_nano = end;
            inner.push(span);
        }
    }

    /// A delivery of `events` (oldest first) to `recipients` subscribers
    /// over `transport`, started at `started` and done now.
    pub fn delivered<'a>(
        &self,
        transport: Transport,
        events: impl IntoIterator<Item = &'a Event>,
        recipients: usize,
        started: SystemTime,
    ) {
        if self.inner.is_none() {
            return;
        }
        let mut events = events.into_iter();
        let Some(first) = events.next() else {
            return;
        };
        let Some((inner, trace)) = self.sampled(&first.trace_id) else {
            return;
        };
        let mut span = delivery_span(transport, (&first.id, &first.tenant_id), trace, started);
        let mut count = 1u64;
        for event in events {
            count += 1;
            if span.links.len() >= MAX_LINKS {
                span.dropped_links_count += 1;
                continue;
            }
            if let Some(trace) = trace_bytes(&event.trace_id) {
                span.links.push(span::Link {
                    trace_id: trace.to_vec(),
                    span_id: publish_span_id(&event.id).to_be_bytes().to_vec(),
                    flags: SAMPLED,
                    ..Default::default()
                });
            }
        }
        if count > 1 {
            span.attributes
                .push(int("messaging.batch.message_count", count as i64));
        } else {
            span.attributes
                .push(text("messaging.destination.name", &first.event_type));
        }
        span.attributes
            .push(int("tc.recipients", recipients as i64));
        span.end_time_unix_nano = unix_nanos(SystemTime::now());
        inner.push(span);
    }

    /// A webhook attempt of an event starting now.
    pub fn attempt(&self, event: Attempted<'_>, endpoint: &str, attempt: u32) -> Attempt {
        let Some((_, trace)) = self.sampled(event.trace_id) else {
            // Export off or not sampled: the receiver continues the trace
            // under the publish span.
            return Attempt {
                span: None,
                traceparent: format!(
                    "00-{}-{:016x}-00",
                    event.trace_id,
                    publish_span_id(event.id)
                ),
            };
        };
        let mut span = delivery_span(
            Transport::Webhook,
            (event.id, event.tenant),
            trace,
            SystemTime::now(),
        );
        span.attributes.extend([
            text("messaging.destination.name", event.event_type),
            text("tc.webhook.endpoint", endpoint),
            int("tc.webhook.attempt", i64::from(attempt)),
        ]);
        let traceparent = format!("00-{}-{}-01", event.trace_id, hex(&span.span_id));
        Attempt {
            span: Some(span),
            traceparent,
        }
    }

    /// Ends a webhook attempt: the receiver's status, or why there was none.
    pub fn attempted(&self, attempt: Attempt, status: Option<u16>, error: Option<&str>) {
        let (Some(inner), Some(mut span)) = (self.inner.as_deref(), attempt.span) else {
            return;
        };
        if let Some(code) = status {
            span.attributes
                .push(int("http.response.status_code", i64::from(code)));
        }
        if let Some(error) = error {
            span.status = Some(Status {
                message: error.to_string(),
                code: status::StatusCode::Error as i32,
            });
        }
        span.end_time_unix_nano = unix_nanos(SystemTime::now());
        inner.push(span);
    }
}

impl Inner {
    /// Queues a finished span, or drops it when the queue is full.
    fn push(&self, span: Span) {
        let size = prost::Message::encoded_len(&span);
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.bytes + size > self.max_bytes {
            drop(queue);
            self.metrics.count("dropped", 1);
            return;
        }
        queue.bytes += size;
        queue.spans.push_back((span, size));
        let full = queue.spans.len() >= BATCH;
        drop(queue);
        if full {
            self.ready.notify_one();
        }
    }

    /// Up to [`BATCH`] spans, oldest first.
    fn take(&self) -> Vec<Span> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let n = queue.spans.len().min(BATCH);
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if let Some((span, size)) = queue.spans.pop_front() {
                queue.bytes -= size;
                out.push(span);
            }
        }
        out
    }
}

/// A delivery span, the child of the publish span of event `id`.
fn delivery_span(
    transport: Transport,
    (id, tenant): (&str, &str),
    trace: [u8; 16],
    started: SystemTime,
) -> Span {
    Span {
        trace_id: trace.to_vec(),
        span_id: random_span_id().to_be_bytes().to_vec(),
        parent_span_id: publish_span_id(id).to_be_bytes().to_vec(),
        flags: SAMPLED | HAS_IS_REMOTE,
        name: format!("deliver {}", transport.name()),
        kind: span::SpanKind::Producer as i32,
        start_time_unix_nano: unix_nanos(started),
        attributes: vec![
            text("messaging.system", "tensorcost-events"),
            text("messaging.operation.type", "send"),
            text("messaging.message.id", id),
            text("tc.tenant", tenant),
            text("tc.transport", transport.name()),
        ],
        ..Default::default()
    }
}

/// The span id of an event's publish: FNV-1a (64 bit) of its id, never 0.
/// Every instance derives the same id, so deliveries name their parent.
pub fn publish_span_id(event_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in event_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash.max(1)
}

fn random_span_id() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0.max(1)
}

/// A W3C trace id (32 lowercase hex characters) as bytes.
fn trace_bytes(trace_id: &str) -> Option<[u8; 16]> {
    let text = trace_id.as_bytes();
    if text.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn attribute(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    attribute(key, any_value::Value::StringValue(value.to_string()))
}

fn int(key: &str, value: i64) -> KeyValue {
    attribute(key, any_value::Value::IntValue(value))
}

fn boolean(key: &str, value: bool) -> KeyValue {
    attribute(key, any_value::Value::BoolValue(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ratio: f64) -> OtlpSettings {
        let mut s: OtlpSettings = crate::config::defaults();
        s.otlp_endpoint = Some("http://127.0.0.1:1".into());
        s.otlp_sample_ratio = ratio;
        s
    }

    fn event(id: &str, trace: &str) -> Event {
        Event {
            trace_id: trace.into(),
            ..crate::broker::tests::event("tenant-a", id, "cost.updated")
        }
    }

    #[test]
    fn settings_are_checked_and_secrets_not_echoed() {
        assert!(endpoint("collector:4317").is_err());
        assert!(endpoint("ftp://collector").is_err());
        assert_eq!(endpoint(" http://c:4317 ").unwrap(), "http://c:4317");
        assert!(ratio("1.5").is_err() && ratio("-0.1").is_err() && ratio("x").is_err());
        assert_eq!(ratio("0.25"), Ok(0.25));
        let parsed = headers("x-api-key=s3cret, Authorization=Bearer abc").unwrap();
        assert_eq!(parsed.get("authorization").unwrap(), "Bearer abc");
        let e = headers("x-api-key=ok,novalue-s3cret").unwrap_err();
        assert_eq!(e, "pair 2: not key=value");
        let e = headers("bad key=s3cret").unwrap_err();
        assert!(e.contains("\"bad key\"") && !e.contains("s3cret"), "{e}");
        let e = headers("k=s3c\u{1}ret").unwrap_err();
        assert!(!e.contains("s3c"), "{e}");
    }

    #[tokio::test]
    async fn sampling_is_decided_on_the_trace_id() {
        let all = Tracer::start(&settings(1.0), "i", OtlpMetrics::default())
            .unwrap()
            .unwrap()
            .0;
        let none = Tracer::start(&settings(0.0), "i", OtlpMetrics::default())
            .unwrap()
            .unwrap()
            .0;
        let half = Tracer::start(&settings(0.5), "i", OtlpMetrics::default())
            .unwrap()
            .unwrap()
            .0;
        // Sampled at 0.5 when the last 8 bytes are below 2^63.
        let low = "4bf92f3577b34da61111929d0e0e4736";
        let high = "4bf92f3577b34da6f3ce929d0e0e4736";
        assert!(all.sampled(low).is_some() && all.sampled(high).is_some());
        assert!(none.sampled(low).is_none() && none.sampled(high).is_none());
        assert!(half.sampled(low).is_some() && half.sampled(high).is_none());
        assert!(all.sampled("not-a-trace").is_none());
        let off = Tracer::off().publishing(&[event("e1", low)], (None, None), SystemTime::now());
        assert!(off.0.is_empty());
    }

    #[tokio::test]
    async fn publish_and_delivery_spans_are_linked_and_the_queue_is_bounded() {
        let mut s = settings(1.0);
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let (tracer, _exporter) = Tracer::start(&s, "i", OtlpMetrics::default())
            .unwrap()
            .unwrap();
        let events = [
            event("e1", trace),
            event("e2", "0af7651916cd43dd8448eb211c80319c"),
        ];
        let spans = tracer.publishing(
            &events,
            (Some(trace), Some(0x00f0_67aa_0ba9_02b7)),
            SystemTime::now(),
        );
        assert_eq!(spans.0.len(), 2);
        let (first, second) = (&spans.0[0].1, &spans.0[1].1);
        assert_eq!(first.parent_span_id, 0x00f0_67aa_0ba9_02b7u64.to_be_bytes());
        assert_eq!(first.flags & IS_REMOTE, IS_REMOTE);
        // Another trace: no parent from this traceparent.
        assert!(second.parent_span_id.is_empty());
        assert_eq!(second.span_id, publish_span_id("e2").to_be_bytes());
        let e1 = publish_span_id("e1").to_be_bytes();
        tracer.published(spans, |i| i == 0);
        tracer.delivered(Transport::Grpc, &events, 1, SystemTime::now());
        let inner = tracer.inner.as_deref().unwrap();
        let queued = inner.take();
        assert_eq!(queued.len(), 3);
        // The duplicate's span got an id of its own.
        assert_ne!(queued[0].span_id, e1);
        // What docs/operations.md says a span costs.
        for span in &queued {
            let size = prost::Message::encoded_len(span);
            assert!((200..=500).contains(&size), "{size} bytes");
        }
        let delivery = &queued[2];
        assert_eq!(delivery.parent_span_id, e1);
        assert_eq!(delivery.links.len(), 1);
        assert_eq!(
            delivery.links[0].span_id,
            publish_span_id("e2").to_be_bytes()
        );
        assert!(delivery.end_time_unix_nano >= delivery.start_time_unix_nano);

        // A queue of 1 KiB takes a few spans, then drops and counts.
        s.otlp_queue_bytes = 1024;
        let metrics = OtlpMetrics::default();
        let (small, _exporter) = Tracer::start(&s, "i", metrics.clone()).unwrap().unwrap();
        for _ in 0..100 {
            small.delivered(Transport::Socketio, &events[..1], 3, SystemTime::now());
        }
        let inner = small.inner.as_deref().unwrap();
        let kept = inner.queue.lock().unwrap().spans.len();
        assert!(kept > 0 && kept < 100, "{kept}");
        assert!(inner.queue.lock().unwrap().bytes <= 1024);
        let dropped = metrics
            .spans
            .get_or_create(&OutcomeLabel { outcome: "dropped" })
            .get();
        assert_eq!(dropped as usize, 100 - kept);
    }

    #[test]
    fn webhook_traceparent_names_the_attempt_or_the_publish() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let off = Tracer::off().attempt(
            Attempted {
                id: "e1",
                tenant: "tenant-a",
                event_type: "cost.updated",
                trace_id: trace,
            },
            "wh_1",
            1,
        );
        assert_eq!(
            off.traceparent,
            format!("00-{trace}-{:016x}-00", publish_span_id("e1"))
        );
        assert!(crate::event::parse_traceparent(&off.traceparent).is_some());
    }
}

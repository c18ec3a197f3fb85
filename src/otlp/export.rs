//! The task that sends queued spans to the collector.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::proto::collector::ExportTraceServiceRequest;
use super::proto::collector::trace_service_client::TraceServiceClient;
use super::proto::common::InstrumentationScope;
use super::proto::resource::Resource;
use super::proto::trace::{ResourceSpans, ScopeSpans, Span};
use super::{BATCH, EVERY, Inner, OtlpSettings, text};

/// Tries of one export request (the first and two retries).
const TRIES: u32 = 3;
/// A failed export is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Sends what the [`super::Tracer`] queues; see [`Exporter::run`].
pub struct Exporter {
    client: TraceServiceClient<tonic::transport::Channel>,
    headers: tonic::metadata::MetadataMap,
    timeout: Duration,
    resource: Resource,
    inner: Arc<Inner>,
    warned_at: Option<Instant>,
}

impl Exporter {
    pub(super) fn new(
        url: &str,
        settings: &OtlpSettings,
        instance: &str,
        inner: Arc<Inner>,
    ) -> anyhow::Result<Self> {
        let headers = match &settings.otlp_headers {
            Some(text) => {
                super::headers(text).map_err(|e| anyhow::anyhow!("TC_OTLP_HEADERS: {e}"))?
            }
            None => Default::default(),
        };
        // Connected at the first export: a collector that starts later is
        // found then.
        let channel = crate::tls::grpc_channel_lazy(
            url,
            "TC_OTLP_ENDPOINT",
            "TC_OTLP_CA_FILE",
            settings.otlp_ca_file.as_deref(),
            settings.otlp_timeout,
        )?;
        Ok(Self {
            client: TraceServiceClient::new(channel),
            headers,
            timeout: settings.otlp_timeout,
            resource: Resource {
                attributes: vec![
                    text("service.name", &settings.otlp_service_name),
                    text("service.version", env!("CARGO_PKG_VERSION")),
                    text("service.instance.id", instance),
                ],
                ..Default::default()
            },
            inner,
            warned_at: None,
        })
    }

    /// Exports a batch when [`BATCH`] spans wait or [`EVERY`] has passed,
    /// until `shutdown`; then what is left, within one export timeout.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.inner.ready.notified() => {}
                () = tokio::time::sleep(EVERY) => {}
            }
            loop {
                let spans = self.inner.take();
                let full = spans.len() == BATCH;
                if !spans.is_empty() {
                    self.export(spans, Some(&shutdown)).await;
                }
                if !full || shutdown.is_cancelled() {
                    break;
                }
            }
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let spans = self.inner.take();
            if spans.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                self.inner.metrics.count("dropped", spans.len());
                continue;
            }
            self.export(spans, None).await;
        }
    }

    /// One export request, tried up to [`TRIES`] times (1 s, then 2 s
    /// apart; not after `shutdown`); its spans are dropped if all fail.
    async fn export(&mut self, spans: Vec<Span>, shutdown: Option<&CancellationToken>) {
        let n = spans.len();
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(self.resource.clone()),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "tensorcost-events".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let mut error = String::new();
        for attempt in 0..TRIES {
            if attempt > 0 {
                let pause = Duration::from_secs(1 << (attempt - 1));
                match shutdown {
                    Some(s) => tokio::select! {
                        () = s.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    },
                    None => break,
                }
            }
            let mut request = tonic::Request::new(body.clone());
            *request.metadata_mut() = self.headers.clone();
            request.set_timeout(self.timeout);
            match tokio::time::timeout(self.timeout, self.client.export(request)).await {
                Ok(Ok(answer)) => {
                    let rejected = answer
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| p.rejected_spans.max(0) as usize)
                        .min(n);
                    self.inner.metrics.count("exported", n - rejected);
                    if rejected > 0 {
                        self.inner.metrics.count("dropped", rejected);
                    }
                    return;
                }
                Ok(Err(status)) => {
                    error = format!("{:?}: {}", status.code(), status.message());
                    self.inner.metrics.failures.inc();
                    // Only these may succeed when tried again (OTLP spec).
                    use tonic::Code::*;
                    if !matches!(
                        status.code(),
                        Cancelled
                            | DeadlineExceeded
                            | Aborted
                            | OutOfRange
                            | Unavailable
                            | DataLoss
                            | ResourceExhausted
                    ) {
                        break;
                    }
                }
                Err(_) => {
                    error = format!("no answer within {:?}", self.timeout);
                    self.inner.metrics.failures.inc();
                }
            }
        }
        self.inner.metrics.count("dropped", n);
        if self.warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            self.warned_at = Some(Instant::now());
            tracing::warn!(spans = n, %error, "OTLP export failed: spans dropped (TC_OTLP_ENDPOINT)");
        }
    }
}

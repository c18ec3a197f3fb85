//! Delivered attempts, recorded in batches.
//!
//! A worker whose delivery succeeded hands it here and sends its next one
//! at once: finishing the job, its attempt-log entry, the
//! `notification.sent` trace event and the metrics are done for every
//! delivery waiting, together, by one task. Per delivery that saves a
//! write handed to the store, a lock of the tenant, and a wake-up of
//! another thread (see docs/benchmarks.md, scenario 7), and it takes them
//! off the time between one request and the next on a connection.
//!
//! Until it is recorded a delivered job stays leased in the store, so a
//! crash in between delivers it again (at-least-once, as any crash within
//! the store's flush interval does). At most [`MAX_WAITING`] deliveries
//! wait; a worker that finds that many records them itself before it goes
//! on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::deliver::{Attempt, Attempted, Delivery};
use super::{ATTEMPTS, Cached, OutcomeLabel, Webhooks, format_ms};
use crate::state::{Finished, Job};

/// Deliveries waiting to be recorded at most.
const MAX_WAITING: usize = 1024;

/// How long the recorder lets deliveries gather once the first is
/// waiting: a batch of a few dozen costs about what one does (one write
/// handed to the store, one log group, one taking of a tenant's lock).
/// It delays the records and trace events, never a delivery.
const GATHER: Duration = Duration::from_millis(2);

/// A delivery whose receiver answered 2xx.
pub(super) struct Delivered {
    pub job: Job,
    pub delivery: Delivery,
    pub endpoint: Arc<Cached>,
    pub status: u16,
    pub latency: Duration,
    /// When the answer came, Unix ms.
    pub at_ms: u64,
}

/// Deliveries waiting for the recorder.
#[derive(Default)]
pub(super) struct Waiting {
    delivered: Mutex<Vec<Delivered>>,
    wake: Notify,
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Delivered>> {
        self.delivered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> Vec<Delivered> {
        std::mem::take(&mut *self.lock())
    }
}

/// Hands a delivery to the recorder; records everything waiting itself
/// when [`MAX_WAITING`] are.
pub(super) async fn delivered(hooks: &Webhooks, delivered: Delivered) {
    let waiting = &hooks.inner.waiting;
    let count = {
        let mut list = waiting.lock();
        list.push(delivered);
        list.len()
    };
    if count == 1 {
        waiting.wake.notify_one();
    } else if count >= MAX_WAITING {
        record(hooks).await;
    }
}

/// The recorder: records what waits whenever a delivery arrives, until
/// `stop`. [`super::Running::stop`] records what is left after the workers
/// have ended.
pub(super) async fn recorder(hooks: Webhooks, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = hooks.inner.waiting.wake.notified() => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(GATHER) => {}
            () = stop.cancelled() => return,
        }
        record(&hooks).await;
    }
}

/// Records every delivery waiting: jobs finished with their log entries in
/// one write, trace events in one publish, metrics.
pub(super) async fn record(hooks: &Webhooks) {
    let batch = hooks.inner.waiting.take();
    if batch.is_empty() {
        return;
    }
    let inner = &hooks.inner;
    inner
        .metrics
        .attempts
        .get_or_create(&OutcomeLabel {
            outcome: "succeeded",
        })
        .inc_by(batch.len() as u64);
    let mut finished = Vec::with_capacity(batch.len());
    let mut events = Vec::with_capacity(batch.len());
    let mut recovered: Vec<Arc<Cached>> = Vec::new();
    for d in batch {
        inner.metrics.latency.observe(d.latency.as_secs_f64());
        let endpoint = &d.endpoint.endpoint;
        let attempt = Attempt {
            event_id: d.delivery.event_id.clone(),
            event_type: d.delivery.event_type.clone(),
            attempt: d.delivery.attempt,
            at: format_ms(d.at_ms),
            status: "succeeded".into(),
            status_code: Some(d.status),
            latency_ms: d.latency.as_millis() as u64,
            error: None,
            next_attempt_at: None,
        };
        tracing::debug!(
            webhook = %endpoint.id,
            event_id = %attempt.event_id,
            attempt = attempt.attempt,
            code = d.status,
            "webhook delivered"
        );
        let event = hooks.make_event(
            &d.delivery.tenant,
            "notification.sent",
            &Attempted {
                webhook_id: &endpoint.id,
                event_id: &d.delivery.event_id,
                event_type: &d.delivery.event_type,
                attempt: d.delivery.attempt,
                status: "sent",
                status_code: Some(d.status),
                error: None,
                next_attempt_at: None,
            },
            &d.delivery.trace_id,
        );
        match event {
            Ok(e) => events.push(e),
            Err(e) => {
                tracing::warn!(webhook = %endpoint.id, "notification.sent not published: {e}")
            }
        }
        finished.push(Finished {
            queue: d.job.queue,
            id: d.job.id,
            key: endpoint.id.clone(),
            value: serde_json::to_string(&attempt).unwrap_or_default(),
        });
        if endpoint.failing_since_ms.is_some()
            && !recovered.iter().any(|c| c.endpoint.id == endpoint.id)
        {
            recovered.push(Arc::clone(&d.endpoint));
        }
    }
    if let Err(e) = inner
        .state
        .finish_logged(ATTEMPTS, finished, inner.settings.webhook_log_keep)
        .await
    {
        tracing::warn!("delivered, but not marked done (they may be delivered again): {e}");
    }
    inner.broker.publish_minted_many(events);
    for cached in recovered {
        super::deliver::update_endpoint(hooks, &cached.endpoint, |e| e.failing_since_ms = None)
            .await;
    }
}

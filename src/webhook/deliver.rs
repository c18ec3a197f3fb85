//! Delivering: the dispatcher that claims due jobs within the concurrency
//! caps, one attempt (sign, POST, classify the answer), and what follows
//! it: done, retried on the schedule, given up, or the endpoint disabled.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Conn, SendError, Target};
use super::endpoint::Endpoint;
use super::record::{self, Delivered};
use super::{ATTEMPTS, DEAD, OutcomeLabel, Webhooks, format_ms, sign};
use crate::clock;
use crate::event::Event;
use crate::state::{Capacity, Finished, Job};

/// How often the dispatcher looks for due jobs when nothing woke it.
const POLL: Duration = Duration::from_millis(250);
/// Longest error text kept from a receiver's answer.
const MAX_ERROR: usize = 300;
/// Jobs claimed ahead for an endpoint whose receiver answers quickly, so
/// that its deliveries follow each other without a claim between them.
const PREFETCH: usize = 128;
/// Bytes of jobs claimed ahead, over all endpoints; past it endpoints claim
/// only for their free places.
const PREFETCH_BYTES: usize = 16 << 20;
/// A receiver that answered a delivery with a 2xx within this long is fast:
/// its endpoint claims ahead.
const FAST: Duration = Duration::from_millis(100);

/// A job's body: one event for one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub endpoint: String,
    pub tenant: String,
    pub event_id: String,
    pub event_type: String,
    pub trace_id: String,
    /// The envelope as JSON: the request body, byte for byte what is signed.
    /// Raw: written into the job as it is, never parsed into a tree.
    pub payload: Box<RawValue>,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// When the first attempt was due, Unix ms.
    pub first_ms: u64,
}

impl Delivery {
    pub fn new(endpoint: &str, event: &Event, attempt: u32) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            tenant: event.tenant_id.clone(),
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            trace_id: event.trace_id.clone(),
            payload: envelope(event),
            attempt,
            first_ms: clock::unix_millis(),
        }
    }

    /// As a job due at `due_ms`; the id is new (a replay is a new job).
    pub fn job(&self, due_ms: u64) -> Job {
        Job {
            id: uuid::Uuid::now_v7().simple().to_string(),
            queue: self.endpoint.clone(),
            due_ms,
            body: serde_json::to_string(self).unwrap_or_default(),
        }
    }
}

/// An event's envelope as raw JSON, what [`Event::to_json`] writes.
pub fn envelope(event: &Event) -> Box<RawValue> {
    // Plain strings and raw JSON already checked: this cannot fail (it
    // would give `null` rather than a panic).
    serde_json::value::to_raw_value(event).unwrap_or_default()
}

/// One attempt, as `GET /v1/webhooks/{id}/deliveries` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub event_id: String,
    pub event_type: String,
    pub attempt: u32,
    pub at: String,
    /// `succeeded` or `failed`.
    pub status: String,
    pub status_code: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
    /// When it is tried again; none when it succeeded or was given up.
    pub next_attempt_at: Option<String>,
}

/// The data of `notification.requested`.
#[derive(Serialize)]
pub struct Requested<'a> {
    pub webhook_id: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub attempt: u32,
    pub status: &'a str,
}

/// The data of `notification.sent` and `notification.failed`.
#[derive(Serialize)]
pub(super) struct Attempted<'a> {
    pub webhook_id: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub attempt: u32,
    pub status: &'a str,
    pub status_code: Option<u16>,
    pub error: Option<&'a str>,
    pub next_attempt_at: Option<&'a str>,
}

/// A delivery given up, kept (bounded) so it can be listed and replayed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dead {
    pub delivery: Delivery,
    pub error: String,
    pub at: String,
}

/// Deliveries in flight here (per endpoint, per tenant, in all), and the
/// jobs claimed for each endpoint that wait for one of its workers.
#[derive(Default)]
pub struct InFlight {
    endpoints: HashMap<String, usize>,
    tenants: HashMap<String, usize>,
    total: usize,
    lanes: HashMap<String, Lane>,
    /// Bytes of jobs in every lane.
    lane_bytes: usize,
}

impl InFlight {
    fn lane(&mut self, endpoint: &str, tenant: &str) -> &mut Lane {
        self.lanes
            .entry(endpoint.to_string())
            .or_insert_with(|| Lane {
                tenant: tenant.to_string(),
                ..Lane::default()
            })
    }
}

/// One endpoint's claimed jobs, in claim order (oldest due first).
#[derive(Default)]
struct Lane {
    tenant: String,
    jobs: VecDeque<Claimed>,
    /// Its last delivery succeeded within [`FAST`]: claim ahead.
    fast: bool,
}

struct Claimed {
    job: Job,
    delivery: Delivery,
    /// When it was claimed: its lease runs from here.
    at: Instant,
}

impl Claimed {
    fn bytes(&self) -> usize {
        self.job.body.len() + 128
    }
}

/// Releases a place in flight when a delivery ends, and wakes the
/// dispatcher.
struct Place {
    hooks: Webhooks,
    endpoint: String,
    tenant: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let inner = &self.hooks.inner;
        {
            let mut guard = inner
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let f = &mut *guard;
            for (map, key) in [
                (&mut f.endpoints, &self.endpoint),
                (&mut f.tenants, &self.tenant),
            ] {
                if let Some(n) = map.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        map.remove(key);
                    }
                }
            }
            f.total = f.total.saturating_sub(1);
            inner.metrics.in_flight.set(f.total as i64);
        }
        inner.wake.notify_one();
    }
}

/// What a claim may take: an endpoint whose receiver is fast enough to
/// claim ahead, up to [`PREFETCH`] jobs waiting (refilled once half of it
/// is gone); any other endpoint its free places, within its tenant's free
/// places. Returns the capacity and the most jobs in all.
fn plan(hooks: &Webhooks) -> (Capacity, usize) {
    let settings = &hooks.inner.settings;
    let tenants = hooks.tenant_endpoints();
    let f = hooks
        .inner
        .in_flight
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let may_prefetch = f.lane_bytes < PREFETCH_BYTES;
    let mut free_total = settings.webhook_max_in_flight.saturating_sub(f.total);
    let mut max = 0;
    let mut limited = Vec::new();
    for (tenant, endpoints) in tenants {
        let mut tenant_free = settings
            .webhook_tenant_concurrency
            .saturating_sub(f.tenants.get(&tenant).copied().unwrap_or(0));
        for id in endpoints {
            let lane = f.lanes.get(&id);
            let waiting = lane.map_or(0, |l| l.jobs.len());
            let room = if may_prefetch && lane.is_some_and(|l| l.fast) {
                if waiting <= PREFETCH / 2 {
                    PREFETCH - waiting
                } else {
                    0
                }
            } else {
                let busy = f.endpoints.get(&id).copied().unwrap_or(0) + waiting;
                let own = settings.webhook_concurrency.saturating_sub(busy);
                let give = own.min(tenant_free).min(free_total);
                tenant_free -= give;
                free_total -= give;
                give
            };
            max += room;
            limited.push((id, room));
        }
    }
    // Queues of endpoints not in the cache (deleted ones) are claimed like
    // any and dropped.
    let default = settings.webhook_concurrency.min(free_total);
    limited.retain(|(_, room)| *room != default);
    (Capacity { default, limited }, max + default)
}

/// Claims due jobs into the endpoints' lanes and starts workers for them,
/// until `stop`; the workers stop after their delivery in progress.
pub async fn dispatcher(hooks: Webhooks, stop: CancellationToken, tasks: TaskTracker) {
    let inner = Arc::clone(&hooks.inner);
    let lease = lease(&inner.settings);
    let mut failing_since: Option<Instant> = None;
    loop {
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
            () = stop.cancelled() => return,
        }
        loop {
            let (cap, max) = plan(&hooks);
            if max == 0 {
                break;
            }
            let jobs = match inner
                .state
                .claim(clock::unix_millis(), lease.as_millis() as u64, &cap, max)
                .await
            {
                Ok(jobs) => {
                    failing_since = None;
                    jobs
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < Duration::from_secs(1) {
                        tracing::warn!("webhook deliveries not claimed: {e}");
                    } else {
                        tracing::debug!("webhook deliveries not claimed: {e}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            };
            if jobs.is_empty() {
                break;
            }
            tracing::debug!(claimed = jobs.len(), "webhook deliveries claimed");
            let at = Instant::now();
            let mut claimed = Vec::with_capacity(jobs.len());
            for job in jobs {
                match serde_json::from_str::<Delivery>(&job.body) {
                    Ok(delivery) => claimed.push(Claimed { job, delivery, at }),
                    Err(_) => {
                        tracing::warn!(job = %job.id, "dropped an unreadable webhook job");
                        let _ = inner.state.finish(&job.queue, &job.id).await;
                    }
                }
            }
            let mut f = inner
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for c in claimed {
                f.lane_bytes += c.bytes();
                f.lane(&c.delivery.endpoint, &c.delivery.tenant)
                    .jobs
                    .push_back(c);
            }
        }
        start_workers(&hooks, &stop, &tasks);
    }
}

/// How long a claimed job is kept from others: long enough for an attempt
/// and its follow-up; a crashed instance's jobs are due again when it ends.
fn lease(settings: &super::WebhookSettings) -> Duration {
    settings.webhook_timeout * 2 + Duration::from_secs(5)
}

/// A worker for each lane with jobs waiting, while its endpoint, its tenant
/// and the instance have free places.
fn start_workers(hooks: &Webhooks, stop: &CancellationToken, tasks: &TaskTracker) {
    let settings = &hooks.inner.settings;
    let known: std::collections::HashSet<String> = hooks
        .tenant_endpoints()
        .into_iter()
        .flat_map(|(_, ids)| ids)
        .collect();
    let mut started = Vec::new();
    {
        let mut f = hooks
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let f = &mut *f;
        // An empty lane is kept while its endpoint exists and is fast (it
        // claims ahead when jobs come).
        f.lanes
            .retain(|id, lane| !lane.jobs.is_empty() || (lane.fast && known.contains(id)));
        for (endpoint, lane) in &f.lanes {
            let mut busy = f.endpoints.get(endpoint).copied().unwrap_or(0);
            let mut tenant = f.tenants.get(&lane.tenant).copied().unwrap_or(0);
            let mut waiting = lane.jobs.len();
            while waiting > 0
                && busy < settings.webhook_concurrency
                && tenant < settings.webhook_tenant_concurrency
                && f.total < settings.webhook_max_in_flight
            {
                busy += 1;
                tenant += 1;
                waiting -= 1;
                f.total += 1;
                started.push((endpoint.clone(), lane.tenant.clone()));
            }
            if busy > 0 {
                f.endpoints.insert(endpoint.clone(), busy);
            }
            if tenant > 0 {
                f.tenants.insert(lane.tenant.clone(), tenant);
            }
        }
        hooks.inner.metrics.in_flight.set(f.total as i64);
    }
    for (endpoint, tenant) in started {
        let place = Place {
            hooks: hooks.clone(),
            endpoint,
            tenant,
        };
        let hooks = hooks.clone();
        let stop = stop.clone();
        tasks.spawn(async move { worker(&hooks, place, &stop).await });
    }
}

/// Delivers its endpoint's claimed jobs one after another, holding one
/// place, until the lane is empty or the service stops.
async fn worker(hooks: &Webhooks, place: Place, stop: &CancellationToken) {
    let inner = &hooks.inner;
    // A job claimed this long ago may not finish its attempt within its
    // lease: it is left to whoever claims it when the lease ends.
    let stale = lease(&inner.settings)
        .saturating_sub(inner.settings.webhook_timeout + Duration::from_secs(1));
    // One connection to the receiver, used for each job in turn.
    let mut conn = inner.client.take(&place.endpoint);
    // Whether the last delivery was fast: set with the next job's taking.
    let mut fast = None;
    while !stop.is_cancelled() {
        let next = {
            let mut f = inner
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let f = &mut *f;
            let lane = match fast.take() {
                Some(fast) => {
                    let lane = f.lane(&place.endpoint, &place.tenant);
                    lane.fast = fast;
                    lane
                }
                None => match f.lanes.get_mut(&place.endpoint) {
                    Some(lane) => lane,
                    None => break,
                },
            };
            let next = lane.jobs.pop_front();
            if lane.fast && lane.jobs.len() == PREFETCH / 2 {
                // Refill while the rest is delivered.
                inner.wake.notify_one();
            }
            if let Some(c) = &next {
                f.lane_bytes -= c.bytes();
            }
            next
        };
        let Some(c) = next else { break };
        if c.at.elapsed() > stale {
            tracing::debug!(job = %c.job.id, "claimed job left to its lease's end");
            continue;
        }
        fast = Some(run(hooks, c.job, c.delivery, &mut conn).await);
    }
    if let Some(fast) = fast {
        let mut f = inner
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.lane(&place.endpoint, &place.tenant).fast = fast;
    }
    if let Some(conn) = conn {
        inner.client.give_back(&place.endpoint, conn);
    }
    drop(place);
}

/// Gives every job waiting in a lane back to its queue, due now (at a
/// stop: the next instance or start delivers them without waiting for
/// their leases).
pub async fn release_lanes(hooks: &Webhooks) {
    let jobs: Vec<Job> = {
        let mut f = hooks
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.lane_bytes = 0;
        let now = clock::unix_millis();
        f.lanes
            .drain()
            .flat_map(|(_, lane)| lane.jobs)
            .map(|c| Job {
                due_ms: now,
                ..c.job
            })
            .collect()
    };
    if let Err(e) = hooks.inner.state.enqueue(jobs).await {
        tracing::warn!(
            "claimed webhook deliveries not given back; they are due when their leases end: {e}"
        );
    }
}

/// The answer to one attempt.
enum Outcome {
    Succeeded(u16),
    /// 410: the receiver says the endpoint is gone.
    Gone,
    Failed {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
        refused: bool,
    },
}

/// One claimed job: attempt it and record what follows. The job stays
/// leased until then. Whether the receiver answered 2xx within [`FAST`].
async fn run(hooks: &Webhooks, job: Job, delivery: Delivery, conn: &mut Option<Conn>) -> bool {
    let inner = &hooks.inner;
    let Some(cached) = hooks.cached(&delivery.tenant, &delivery.endpoint) else {
        tracing::debug!(webhook = %delivery.endpoint, "delivery dropped: its endpoint was deleted");
        // The endpoint was deleted.
        let _ = inner.state.finish(&job.queue, &job.id).await;
        return false;
    };
    let endpoint = &cached.endpoint;
    if !endpoint.enabled {
        let reason = endpoint
            .disabled_reason
            .clone()
            .unwrap_or_else(|| "endpoint disabled".into());
        give_up(hooks, delivery, &format!("not attempted: {reason}")).await;
        let _ = inner.state.finish(&job.queue, &job.id).await;
        return false;
    }
    let started = Instant::now();
    let outcome = send(hooks, &cached.signer, &cached.target, &delivery, conn).await;
    let latency = started.elapsed();
    if let Outcome::Succeeded(status) = outcome {
        // Recorded with others while the next request goes out.
        let delivered = Delivered {
            job,
            delivery,
            endpoint: Arc::clone(&cached),
            status,
            latency,
            at_ms: clock::unix_millis(),
        };
        record::delivered(hooks, delivered).await;
        return latency < FAST;
    }
    follow_up(hooks, endpoint, Some(&job), delivery, outcome, latency).await;
    false
}

/// `POST /v1/webhooks/{id}/test`: one attempt now, no retry.
pub async fn attempt_once(hooks: &Webhooks, endpoint: &Endpoint, delivery: Delivery) -> Attempt {
    let started = Instant::now();
    let target = Target::checked(&hooks.inner.guard, &endpoint.url);
    let mut conn = hooks.inner.client.take(&endpoint.id);
    let signer = sign::Signer::new(endpoint);
    let outcome = send(hooks, &signer, &target, &delivery, &mut conn).await;
    if let Some(conn) = conn {
        hooks.inner.client.give_back(&endpoint.id, conn);
    }
    follow_up(hooks, endpoint, None, delivery, outcome, started.elapsed()).await
}

/// Signs and POSTs the payload to `target` (the endpoint's URL as the
/// guard checked it), on `conn` when it holds a usable connection; the
/// attempt is a span of the event's trace, and the request's
/// `traceparent` names it.
async fn send(
    hooks: &Webhooks,
    signer: &sign::Signer,
    target: &Result<Target, super::guard::Refused>,
    d: &Delivery,
    conn: &mut Option<Conn>,
) -> Outcome {
    let tracer = &hooks.inner.tracer;
    let span = tracer.attempt(
        crate::otlp::Attempted {
            id: &d.event_id,
            tenant: &d.tenant,
            event_type: &d.event_type,
            trace_id: &d.trace_id,
        },
        &d.endpoint,
        d.attempt,
    );
    let outcome = post(hooks, signer, target, d, conn, &span.traceparent).await;
    let (status, error) = match &outcome {
        Outcome::Succeeded(code) => (Some(*code), None),
        Outcome::Gone => (
            Some(410),
            Some("HTTP 410: the receiver says the endpoint is gone"),
        ),
        Outcome::Failed { status, error, .. } => (*status, Some(error.as_str())),
    };
    tracer.attempted(span, status, error);
    outcome
}

async fn post(
    hooks: &Webhooks,
    signer: &sign::Signer,
    target: &Result<Target, super::guard::Refused>,
    d: &Delivery,
    conn: &mut Option<Conn>,
    traceparent: &str,
) -> Outcome {
    let inner = &hooks.inner;
    let target = match target {
        Ok(target) => target,
        Err(refused) => {
            return Outcome::Failed {
                status: None,
                error: refused.to_string(),
                retry_after: None,
                refused: true,
            };
        }
    };
    let now_ms = clock::unix_millis();
    let signature = signer.header_value(now_ms, d.payload.get().as_bytes());
    let value = |text: String| HeaderValue::from_maybe_shared(Bytes::from(text));
    let headers = match (
        value(signature),
        value(d.event_id.clone()),
        value(d.event_type.clone()),
        value(traceparent.to_string()),
    ) {
        (Ok(sig), Ok(id), Ok(kind), Ok(traceparent)) => [
            (HeaderName::from_static(sign::HEADER), sig),
            (HeaderName::from_static("x-tensorcost-event-id"), id),
            (HeaderName::from_static("x-tensorcost-event-type"), kind),
            (
                HeaderName::from_static("x-tensorcost-delivery-attempt"),
                HeaderValue::from(d.attempt),
            ),
            (HeaderName::from_static("traceparent"), traceparent),
        ],
        _ => {
            return Outcome::Failed {
                status: None,
                error: "the event id or type cannot be sent in a header".into(),
                retry_after: None,
                refused: false,
            };
        }
    };
    let body = Bytes::copy_from_slice(d.payload.get().as_bytes());
    let posted = tokio::time::timeout(
        inner.settings.webhook_timeout,
        inner.client.post(conn, target, &headers, body),
    )
    .await;
    let answer = match posted {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            let mut error = e.to_string();
            // On a character boundary: the text may not be ASCII.
            error.truncate(error.floor_char_boundary(MAX_ERROR));
            return Outcome::Failed {
                status: None,
                error,
                retry_after: None,
                refused: matches!(e, SendError::Refused(_)),
            };
        }
        Err(_) => {
            return Outcome::Failed {
                status: None,
                error: SendError::Timeout.to_string(),
                retry_after: None,
                refused: false,
            };
        }
    };
    let status = answer.status;
    if status.is_success() {
        return Outcome::Succeeded(status.as_u16());
    }
    if status == StatusCode::GONE {
        return Outcome::Gone;
    }
    let retry_after = if matches!(status.as_u16(), 429 | 503) {
        answer.retry_after.as_deref().and_then(parse_retry_after)
    } else {
        None
    };
    let mut error = format!("HTTP {}", status.as_u16());
    if status.is_redirection() {
        error.push_str(": redirects are not followed; register the final URL");
    }
    Outcome::Failed {
        status: Some(status.as_u16()),
        error,
        retry_after,
        refused: false,
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Records an attempt and does what follows it; returns the attempt.
async fn follow_up(
    hooks: &Webhooks,
    endpoint: &Endpoint,
    job: Option<&Job>,
    delivery: Delivery,
    outcome: Outcome,
    latency: Duration,
) -> Attempt {
    let inner = &hooks.inner;
    let settings = &inner.settings;
    let now = clock::unix_millis();
    inner.metrics.latency.observe(latency.as_secs_f64());
    let mut attempt = Attempt {
        event_id: delivery.event_id.clone(),
        event_type: delivery.event_type.clone(),
        attempt: delivery.attempt,
        at: format_ms(now),
        status: "failed".into(),
        status_code: None,
        latency_ms: latency.as_millis() as u64,
        error: None,
        next_attempt_at: None,
    };
    let trace = delivery.trace_id.clone();
    // A job delivered: finished together with its attempt's log entry.
    let mut done = None;
    match outcome {
        Outcome::Succeeded(code) => {
            inner
                .metrics
                .attempts
                .get_or_create(&OutcomeLabel {
                    outcome: "succeeded",
                })
                .inc();
            attempt.status = "succeeded".into();
            attempt.status_code = Some(code);
            done = job;
            if endpoint.failing_since_ms.is_some() {
                update_endpoint(hooks, endpoint, |e| e.failing_since_ms = None).await;
            }
        }
        Outcome::Gone => {
            inner
                .metrics
                .attempts
                .get_or_create(&OutcomeLabel { outcome: "gone" })
                .inc();
            attempt.status_code = Some(410);
            attempt.error = Some("HTTP 410 Gone: endpoint disabled".into());
            disable(hooks, endpoint, "the receiver answered 410 Gone").await;
            if let Some(job) = job {
                give_up(hooks, delivery.clone(), "HTTP 410 Gone: endpoint disabled").await;
                let _ = inner.state.finish(&job.queue, &job.id).await;
            }
        }
        Outcome::Failed {
            status,
            error,
            retry_after,
            refused,
        } => {
            let label = if refused { "refused" } else { "failed" };
            inner
                .metrics
                .attempts
                .get_or_create(&OutcomeLabel { outcome: label })
                .inc();
            attempt.status_code = status;
            attempt.error = Some(error.clone());
            if let Some(job) = job {
                let steps = &settings.webhook_retry_schedule.0;
                match steps.get(delivery.attempt as usize - 1) {
                    Some(step) => {
                        let last = *steps.last().unwrap_or(step);
                        let wait = match retry_after {
                            Some(asked) => asked.clamp(Duration::from_secs(1), last),
                            None => jitter(*step, &job.id),
                        };
                        let due = now.saturating_add(wait.as_millis() as u64);
                        attempt.next_attempt_at = Some(format_ms(due));
                        let mut next = delivery.clone();
                        next.attempt += 1;
                        let retry = Job {
                            id: job.id.clone(),
                            queue: job.queue.clone(),
                            due_ms: due,
                            body: serde_json::to_string(&next).unwrap_or_default(),
                        };
                        if let Err(e) = inner.state.enqueue(vec![retry]).await {
                            tracing::warn!(webhook = %endpoint.id, "retry not scheduled; the job is tried again when its lease ends: {e}");
                        }
                    }
                    None => {
                        give_up(
                            hooks,
                            delivery.clone(),
                            &format!("gave up after {} attempts: {error}", delivery.attempt),
                        )
                        .await;
                        let _ = inner.state.finish(&job.queue, &job.id).await;
                    }
                }
                let since = endpoint.failing_since_ms.unwrap_or(now);
                if now.saturating_sub(since) >= settings.webhook_disable_after.as_millis() as u64 {
                    disable(
                        hooks,
                        endpoint,
                        &format!(
                            "every delivery failed for {} (TC_WEBHOOK_DISABLE_AFTER)",
                            humantime::format_duration(settings.webhook_disable_after)
                        ),
                    )
                    .await;
                } else if endpoint.failing_since_ms.is_none() {
                    update_endpoint(hooks, endpoint, |e| {
                        e.failing_since_ms.get_or_insert(now);
                    })
                    .await;
                }
            }
        }
    }
    tracing::debug!(
        webhook = %endpoint.id,
        event_id = %attempt.event_id,
        attempt = attempt.attempt,
        status = %attempt.status,
        code = ?attempt.status_code,
        error = ?attempt.error,
        "webhook attempt"
    );
    let value = serde_json::to_string(&attempt).unwrap_or_default();
    let keep = settings.webhook_log_keep;
    if let Some(job) = done {
        let finished = Finished {
            queue: job.queue.clone(),
            id: job.id.clone(),
            key: endpoint.id.clone(),
            value,
        };
        if let Err(e) = inner
            .state
            .finish_logged(ATTEMPTS, vec![finished], keep)
            .await
        {
            tracing::warn!(webhook = %endpoint.id, "delivered, but not marked done (it may be delivered again): {e}");
        }
    } else if let Err(e) = inner
        .state
        .push_log(ATTEMPTS, &endpoint.id, value, keep)
        .await
    {
        tracing::debug!(webhook = %endpoint.id, "attempt not logged: {e}");
    }
    let (kind, status) = if attempt.status == "succeeded" {
        ("notification.sent", "sent")
    } else {
        ("notification.failed", "failed")
    };
    hooks.publish(
        &delivery.tenant,
        kind,
        &Attempted {
            webhook_id: &endpoint.id,
            event_id: &delivery.event_id,
            event_type: &delivery.event_type,
            attempt: delivery.attempt,
            status,
            status_code: attempt.status_code,
            error: attempt.error.as_deref(),
            next_attempt_at: attempt.next_attempt_at.as_deref(),
        },
        &trace,
    );
    attempt
}

/// Spreads retries of many deliveries: the wait ±10%, fixed per job.
fn jitter(step: Duration, job_id: &str) -> Duration {
    use std::hash::BuildHasher;
    let h = foldhash::fast::FixedState::default().hash_one(job_id);
    let permille = 900 + (h % 201); // 900..=1100
    step.mul_f64(permille as f64 / 1000.0)
}

/// Keeps a delivery among the given-up ones (listed, replayable).
pub async fn give_up(hooks: &Webhooks, delivery: Delivery, error: &str) {
    let inner = &hooks.inner;
    inner.metrics.given_up.inc();
    tracing::info!(
        webhook = %delivery.endpoint,
        tenant = %delivery.tenant,
        event_id = %delivery.event_id,
        trace_id = %delivery.trace_id,
        "webhook delivery given up: {error}"
    );
    let endpoint = delivery.endpoint.clone();
    let dead = Dead {
        delivery,
        error: error.to_string(),
        at: format_ms(clock::unix_millis()),
    };
    if let Err(e) = inner
        .state
        .push_log(
            DEAD,
            &endpoint,
            serde_json::to_string(&dead).unwrap_or_default(),
            inner.settings.webhook_log_keep,
        )
        .await
    {
        tracing::warn!(webhook = %endpoint, "given-up delivery not kept: {e}");
    }
}

/// Disables an endpoint and publishes `system.webhook_disabled`.
async fn disable(hooks: &Webhooks, endpoint: &Endpoint, reason: &str) {
    if !endpoint.enabled {
        return;
    }
    tracing::warn!(tenant = %endpoint.tenant, webhook = %endpoint.id, "webhook disabled: {reason}");
    let reason_owned = reason.to_string();
    update_endpoint(hooks, endpoint, move |e| {
        e.enabled = false;
        e.disabled_reason = Some(reason_owned);
    })
    .await;
    hooks.publish(
        &endpoint.tenant,
        "system.webhook_disabled",
        &serde_json::json!({
            "webhook_id": endpoint.id,
            "url": endpoint.url,
            "reason": reason,
        }),
        "",
    );
}

/// Reads the endpoint again, changes it and writes it (a deleted one
/// stays deleted).
pub(super) async fn update_endpoint(
    hooks: &Webhooks,
    endpoint: &Endpoint,
    change: impl FnOnce(&mut Endpoint),
) {
    let Ok(mut fresh) = hooks.load(&endpoint.tenant, &endpoint.id).await else {
        return;
    };
    change(&mut fresh);
    fresh.updated_at = clock::timestamp_now(SystemTime::now());
    if let Err(e) = hooks.save(&fresh).await {
        tracing::warn!(webhook = %endpoint.id, "endpoint not updated: {}", e.message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("soon"), None);
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(100));
        let d = parse_retry_after(&future).unwrap();
        assert!(
            d > Duration::from_secs(90) && d <= Duration::from_secs(100),
            "{d:?}"
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for i in 0..100 {
            let d = jitter(Duration::from_secs(100), &format!("job{i}"));
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
    }
}

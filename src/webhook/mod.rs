//! Webhooks: every event a tenant's endpoint asks for, POSTed to it,
//! signed ([`sign`]), retried on a schedule ([`deliver`]), durable through
//! restarts and shared by instances (the [`crate::state`] store), and kept
//! away from private networks ([`guard`]).
//!
//! How an event becomes deliveries:
//! 1. [`Tap`] sees every event accepted on this instance (never a relayed
//!    one: the instance that accepted an event hands it to webhooks, so it
//!    is handed over once across the cluster). If some endpoint of the
//!    tenant wants its type, it goes into a bounded channel.
//! 2. The enqueuer writes one job per (event, endpoint) into the state
//!    store, in batches, each committed before it continues.
//! 3. The dispatcher claims due jobs (leased, so a crashed instance's jobs
//!    are taken over when the lease ends), at most `TC_WEBHOOK_CONCURRENCY`
//!    in flight per endpoint and `TC_WEBHOOK_TENANT_CONCURRENCY` per
//!    tenant, and delivers them.
//!
//! `notification.*` events (the delivery trace this module publishes) are
//! never delivered as webhooks, so deliveries cannot feed themselves.

pub mod client;
pub mod deliver;
pub mod endpoint;
pub mod guard;
mod record;
pub mod rest;
pub mod sign;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, Persist, TypeFilter};
use crate::clock;
use crate::config::parse::{duration, positive};
use crate::error::{ApiError, Code};
use crate::event::{self, SharedEvent};
use crate::state::{Job, State};
use deliver::{Attempt, Dead, Delivery};
use endpoint::{Endpoint, View};
use guard::Guard;

/// State table of endpoints; logs of attempts and of given-up deliveries.
const ENDPOINTS: &str = "webhooks";
const ATTEMPTS: &str = "webhook_attempts";
const DEAD: &str = "webhook_dead";
/// Version counter of the endpoint table, for other instances' caches.
const VERSION: &str = "webhooks";

/// Settings of webhooks: flags and `TC_*` variables of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct WebhookSettings {
    /// A delivery succeeds on a 2xx answer within this long.
    #[arg(long, env = "TC_WEBHOOK_TIMEOUT", default_value = "15s", value_parser = duration)]
    pub webhook_timeout: Duration,

    /// Waits before each retry, comma-separated; a delivery is given up
    /// after the last (about 3 days by default).
    #[arg(
        long,
        env = "TC_WEBHOOK_RETRY_SCHEDULE",
        default_value = "5s,5m,30m,2h,5h,10h,14h,20h,24h",
        value_parser = parse_schedule
    )]
    pub webhook_retry_schedule: Schedule,

    /// An endpoint whose every delivery has failed for this long is
    /// disabled.
    #[arg(long, env = "TC_WEBHOOK_DISABLE_AFTER", default_value = "5d", value_parser = duration)]
    pub webhook_disable_after: Duration,

    /// Deliveries in flight at once to one endpoint, per instance.
    #[arg(long, env = "TC_WEBHOOK_CONCURRENCY", default_value_t = 4, value_parser = positive)]
    pub webhook_concurrency: usize,

    /// Deliveries in flight at once for one tenant's endpoints, per
    /// instance.
    #[arg(long, env = "TC_WEBHOOK_TENANT_CONCURRENCY", default_value_t = 16, value_parser = positive)]
    pub webhook_tenant_concurrency: usize,

    /// Deliveries in flight at once in all, per instance.
    #[arg(long, env = "TC_WEBHOOK_MAX_IN_FLIGHT", default_value_t = 256, value_parser = positive)]
    pub webhook_max_in_flight: usize,

    /// Host names, IP addresses or CIDRs that webhooks may reach although
    /// they are loopback or private (development, tests, internal
    /// receivers), comma-separated.
    #[arg(long, env = "TC_WEBHOOK_ALLOW_HOSTS", default_value = "")]
    pub webhook_allow_hosts: String,

    /// PEM file of CA certificates trusted for `https://` receivers beside
    /// the system's (receivers behind a private CA).
    #[arg(long, env = "TC_WEBHOOK_CA_FILE")]
    pub webhook_ca_file: Option<std::path::PathBuf>,

    /// Most endpoints one tenant may register.
    #[arg(long, env = "TC_WEBHOOK_MAX_ENDPOINTS", default_value_t = 100, value_parser = positive)]
    pub webhook_max_endpoints: usize,

    /// Most deliveries waiting for one endpoint; past it new deliveries
    /// are given up at once (listed, replayable).
    #[arg(long, env = "TC_WEBHOOK_MAX_PENDING", default_value_t = 100_000, value_parser = positive)]
    pub webhook_max_pending: usize,

    /// Events waiting to be written as deliveries; past it an event is not
    /// delivered as a webhook (counted, logged).
    #[arg(long, env = "TC_WEBHOOK_QUEUE", default_value_t = 65_536, value_parser = positive)]
    pub webhook_queue: usize,

    /// Attempts and given-up deliveries kept per endpoint for listing.
    #[arg(long, env = "TC_WEBHOOK_LOG_KEEP", default_value_t = 1000, value_parser = positive)]
    pub webhook_log_keep: usize,
}

/// The retry schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

fn parse_schedule(text: &str) -> Result<Schedule, String> {
    let steps: Vec<Duration> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            humantime::parse_duration(s)
                .map_err(|e| format!("{s:?} is not a duration like 5s, 30m or 2h: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if steps.is_empty() {
        return Err("at least one wait, e.g. 5s,5m,30m".into());
    }
    Ok(Schedule(steps))
}

impl Default for WebhookSettings {
    fn default() -> Self {
        crate::config::defaults()
    }
}

/// Counters behind `/metrics`; no per-endpoint or per-tenant labels.
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    /// Attempts by outcome: succeeded, failed, refused (SSRF guard), gone.
    pub attempts: Family<OutcomeLabel, Counter>,
    pub latency: Histogram,
    /// Jobs waiting (all instances, with Redis).
    pub pending: Gauge,
    pub in_flight: Gauge,
    /// Endpoints disabled now (this instance's view).
    pub disabled: Gauge,
    /// Deliveries given up (schedule exhausted, endpoint gone or disabled,
    /// pending limit).
    pub given_up: Counter,
    /// Events not handed to webhooks because the queue was full.
    pub dropped: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self {
            attempts: Family::default(),
            latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
            ]),
            pending: Gauge::default(),
            in_flight: Gauge::default(),
            disabled: Gauge::default(),
            given_up: Counter::default(),
            dropped: Counter::default(),
        }
    }
}

/// A cached endpoint with its parsed filter.
struct Cached {
    endpoint: Endpoint,
    /// None when its stored types no longer parse: matches nothing.
    filter: Option<TypeFilter>,
    /// Its URL parsed and checked by the guard once, not per attempt.
    target: Result<client::Target, guard::Refused>,
    /// Its secrets as keys, made once.
    signer: sign::Signer,
}

impl Cached {
    fn wants(&self, event_type: &str) -> bool {
        self.endpoint.enabled && self.filter.as_ref().is_some_and(|f| f.matches(event_type))
    }
}

type Cache = HashMap<String, Vec<Arc<Cached>>>;

pub(crate) struct Inner {
    state: State,
    broker: Broker,
    settings: WebhookSettings,
    guard: Arc<Guard>,
    client: client::Client,
    cache: RwLock<Cache>,
    cache_version: AtomicU64,
    wake: Notify,
    metrics: WebhookMetrics,
    in_flight: std::sync::Mutex<deliver::InFlight>,
    /// Delivered attempts waiting to be recorded.
    waiting: record::Waiting,
    /// Spans of attempts (OTLP), and each request's `traceparent`.
    tracer: crate::otlp::Tracer,
}

/// The webhook service. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

/// Running tasks of the service.
pub struct Running {
    hooks: Webhooks,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Running {
    /// Writes what the enqueuer holds, lets deliveries in flight finish
    /// (at most the webhook timeout), gives jobs claimed ahead back to
    /// their queues, and returns.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
        record::record(&self.hooks).await;
        deliver::release_lanes(&self.hooks).await;
    }
}

fn lock_read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock_write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Errors of the state store reach clients as `unavailable`, named.
fn unavailable(e: crate::state::StateError) -> ApiError {
    tracing::warn!("{e}");
    ApiError::new(Code::Unavailable, format!("{e}; try again"))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(Code::NotFound, format!("webhook {id} not found"))
}

impl Webhooks {
    /// The service over `state`. Start its tasks with [`Webhooks::start`].
    pub fn new(
        state: State,
        broker: Broker,
        settings: WebhookSettings,
        metrics: WebhookMetrics,
        tracer: crate::otlp::Tracer,
    ) -> anyhow::Result<Self> {
        let guard =
            Arc::new(Guard::parse(&settings.webhook_allow_hosts).map_err(anyhow::Error::msg)?);
        let client = client::Client::new(
            Arc::clone(&guard),
            settings.webhook_ca_file.as_deref(),
            settings.webhook_timeout.min(Duration::from_secs(10)),
            settings.webhook_concurrency,
            settings.webhook_max_in_flight,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                state,
                broker,
                settings,
                guard,
                client,
                cache: RwLock::new(HashMap::new()),
                cache_version: AtomicU64::new(u64::MAX),
                wake: Notify::new(),
                metrics,
                in_flight: std::sync::Mutex::new(deliver::InFlight::default()),
                waiting: record::Waiting::default(),
                tracer,
            }),
        })
    }

    /// Loads the endpoints, then starts the enqueuer, the dispatcher and the
    /// cache refresher. Returns the tap for the broker's publish path.
    pub async fn start(&self) -> anyhow::Result<(Running, Box<dyn Persist>)> {
        self.refresh_cache(true)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (tx, rx) = mpsc::channel(self.inner.settings.webhook_queue);
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(self.clone().enqueuer(rx, stop.clone()));
        tasks.spawn(deliver::dispatcher(
            self.clone(),
            stop.clone(),
            tasks.clone(),
        ));
        tasks.spawn(self.clone().refresher(stop.clone()));
        tasks.spawn(record::recorder(self.clone(), stop.clone()));
        // Closed for `wait`; the dispatcher still spawns deliveries on it.
        tasks.close();
        let tap = Tap {
            tx,
            inner: Arc::clone(&self.inner),
            warning: clock::OncePerSecond::default(),
        };
        Ok((
            Running {
                hooks: self.clone(),
                stop,
                tasks,
            },
            Box::new(tap),
        ))
    }

    /// Re-reads every endpoint when the table changed (or `force`).
    async fn refresh_cache(&self, force: bool) -> crate::state::Result<()> {
        let inner = &self.inner;
        let version = inner.state.version(VERSION).await?;
        if !force && version == inner.cache_version.load(Ordering::Acquire) {
            return Ok(());
        }
        let rows = inner.state.list_all(ENDPOINTS).await?;
        let mut cache: Cache = HashMap::new();
        let mut disabled = 0;
        for (tenant, id, value) in rows {
            match serde_json::from_str::<Endpoint>(&value) {
                Ok(endpoint) => {
                    if !endpoint.enabled {
                        disabled += 1;
                    }
                    let filter = TypeFilter::parse(&endpoint.types).ok();
                    cache.entry(tenant).or_default().push(Arc::new(Cached {
                        target: client::Target::checked(&inner.guard, &endpoint.url),
                        signer: sign::Signer::new(&endpoint),
                        endpoint,
                        filter,
                    }));
                }
                Err(e) => {
                    tracing::warn!(tenant, webhook = id, "skipped an unreadable endpoint: {e}")
                }
            }
        }
        inner.metrics.disabled.set(disabled);
        *lock_write(&inner.cache) = cache;
        inner.cache_version.store(version, Ordering::Release);
        Ok(())
    }

    /// Other instances change endpoints too (with Redis): look every second.
    async fn refresher(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if let Err(e) = self.refresh_cache(false).await {
                tracing::debug!("webhook endpoints not refreshed: {e}");
            }
            self.inner.client.sweep();
            if let Ok(n) = self.inner.state.queued().await {
                self.inner.metrics.pending.set(n as i64);
            }
        }
    }

    /// An endpoint of `tenant` from the cache.
    fn cached(&self, tenant: &str, id: &str) -> Option<Arc<Cached>> {
        lock_read(&self.inner.cache)
            .get(tenant)?
            .iter()
            .find(|c| c.endpoint.id == id)
            .cloned()
    }

    /// The endpoint ids of each tenant, for the dispatcher's tenant caps.
    fn tenant_endpoints(&self) -> Vec<(String, Vec<String>)> {
        lock_read(&self.inner.cache)
            .iter()
            .map(|(t, eps)| {
                (
                    t.clone(),
                    eps.iter().map(|c| c.endpoint.id.clone()).collect(),
                )
            })
            .collect()
    }

    /// Writes one endpoint and tells every cache.
    async fn save(&self, endpoint: &Endpoint) -> Result<(), ApiError> {
        let value = serde_json::to_string(endpoint)
            .map_err(|e| ApiError::new(Code::Internal, format!("endpoint: {e}")))?;
        self.inner
            .state
            .put(ENDPOINTS, &endpoint.tenant, &endpoint.id, value)
            .await
            .map_err(unavailable)?;
        self.changed().await;
        Ok(())
    }

    async fn changed(&self) {
        if let Err(e) = self.inner.state.bump(VERSION).await {
            tracing::warn!("webhook endpoints changed but other instances were not told: {e}");
        }
        if let Err(e) = self.refresh_cache(true).await {
            tracing::warn!("webhook endpoints not reloaded: {e}");
        }
    }

    /// Reads an endpoint from the store (not the cache): REST answers are
    /// never stale.
    async fn load(&self, tenant: &str, id: &str) -> Result<Endpoint, ApiError> {
        if endpoint_id_invalid(id) {
            return Err(not_found(id));
        }
        let value = self
            .inner
            .state
            .get(ENDPOINTS, tenant, id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| not_found(id))?;
        serde_json::from_str(&value)
            .map_err(|e| ApiError::new(Code::Internal, format!("webhook {id} is unreadable: {e}")))
    }

    // ---- the REST surface's operations; App checks token, scope, tenant.

    pub async fn create(&self, tenant: &str, body: endpoint::Create) -> Result<View, ApiError> {
        let url = body
            .url
            .as_deref()
            .ok_or_else(|| ApiError::invalid("url: required"))?;
        let url = endpoint::check_url(&self.inner.guard, url)?;
        let types = body.types.ok_or_else(|| {
            ApiError::invalid("types: required: list types or prefixes (alert.*), or [\"*\"]")
        })?;
        let types = endpoint::check_types(&types)?;
        let description = endpoint::check_description(body.description.as_deref().unwrap_or(""))?;
        let existing = self
            .inner
            .state
            .list(ENDPOINTS, tenant)
            .await
            .map_err(unavailable)?
            .len();
        let max = self.inner.settings.webhook_max_endpoints;
        if existing >= max {
            return Err(ApiError::new(
                Code::ResourceExhausted,
                format!(
                    "this tenant has {existing} webhooks, the limit (TC_WEBHOOK_MAX_ENDPOINTS) is {max}"
                ),
            ));
        }
        let now = clock::timestamp_now(SystemTime::now());
        let secret = endpoint::new_secret();
        let endpoint = Endpoint {
            id: endpoint::new_id(),
            tenant: tenant.to_string(),
            url,
            types,
            description,
            enabled: body.enabled.unwrap_or(true),
            created_at: now.clone(),
            updated_at: now,
            secrets: vec![endpoint::Secret {
                value: secret.clone(),
                expires_at_ms: None,
            }],
            failing_since_ms: None,
            disabled_reason: None,
        };
        self.save(&endpoint).await?;
        // The host only: a URL's path or query may carry a receiver's token.
        let host = url::Url::parse(&endpoint.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        tracing::info!(tenant, webhook = %endpoint.id, %host, "webhook created");
        let mut view = endpoint.view();
        view.secret = Some(secret);
        Ok(view)
    }

    pub async fn list(&self, tenant: &str) -> Result<Vec<View>, ApiError> {
        let rows = self
            .inner
            .state
            .list(ENDPOINTS, tenant)
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_str::<Endpoint>(&v).ok())
            .map(|e| e.view())
            .collect())
    }

    pub async fn get(&self, tenant: &str, id: &str) -> Result<View, ApiError> {
        Ok(self.load(tenant, id).await?.view())
    }

    pub async fn update(
        &self,
        tenant: &str,
        id: &str,
        patch: endpoint::Patch,
    ) -> Result<View, ApiError> {
        let mut endpoint = self.load(tenant, id).await?;
        if let Some(url) = patch.url {
            endpoint.url = endpoint::check_url(&self.inner.guard, &url)?;
        }
        if let Some(types) = patch.types {
            endpoint.types = endpoint::check_types(&types)?;
        }
        if let Some(d) = patch.description {
            endpoint.description = endpoint::check_description(&d)?;
        }
        if let Some(enabled) = patch.enabled {
            if enabled && !endpoint.enabled {
                endpoint.failing_since_ms = None;
                endpoint.disabled_reason = None;
            }
            endpoint.enabled = enabled;
        }
        endpoint.updated_at = clock::timestamp_now(SystemTime::now());
        self.save(&endpoint).await?;
        self.inner.wake.notify_one();
        Ok(endpoint.view())
    }

    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), ApiError> {
        let endpoint = self.load(tenant, id).await?;
        let state = &self.inner.state;
        state
            .delete(ENDPOINTS, tenant, &endpoint.id)
            .await
            .map_err(unavailable)?;
        self.changed().await;
        // Its queue and logs go with it; a failure here leaves jobs that
        // are dropped when claimed (their endpoint is gone).
        for result in [
            state.drop_queue(&endpoint.id).await,
            state.delete_log(ATTEMPTS, &endpoint.id).await,
            state.delete_log(DEAD, &endpoint.id).await,
        ] {
            if let Err(e) = result {
                tracing::warn!(webhook = %endpoint.id, "deleted, but not all of its deliveries were removed: {e}");
            }
        }
        tracing::info!(tenant, webhook = %endpoint.id, "webhook deleted");
        Ok(())
    }

    pub async fn rotate(
        &self,
        tenant: &str,
        id: &str,
        body: endpoint::Rotate,
    ) -> Result<Rotated, ApiError> {
        let overlap = endpoint::parse_overlap(body.overlap.as_deref())?;
        let mut endpoint = self.load(tenant, id).await?;
        let secret = endpoint::new_secret();
        let expires = endpoint.rotate(secret.clone(), clock::unix_millis(), overlap);
        endpoint.updated_at = clock::timestamp_now(SystemTime::now());
        self.save(&endpoint).await?;
        tracing::info!(tenant, webhook = %endpoint.id, "webhook secret rotated");
        Ok(Rotated {
            secret,
            previous_expires_at: expires.map(format_ms),
        })
    }

    /// Delivers a `system.webhook_test` event to the endpoint now, once,
    /// and answers with the attempt.
    pub async fn test(&self, tenant: &str, id: &str) -> Result<Attempt, ApiError> {
        let endpoint = self.load(tenant, id).await?;
        let event = self
            .make_event(
                tenant,
                "system.webhook_test",
                &serde_json::json!({
                    "webhook_id": endpoint.id,
                    "message": "a test delivery from tensorcost-events",
                }),
                "",
            )
            .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
        let delivery = Delivery::new(&endpoint.id, &event, 1);
        Ok(deliver::attempt_once(self, &endpoint, delivery).await)
    }

    /// Recent attempts, newest first; `status` `succeeded` or `failed`.
    pub async fn deliveries(
        &self,
        tenant: &str,
        id: &str,
        status: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Attempt>, ApiError> {
        let endpoint = self.load(tenant, id).await?;
        let want = match status {
            None | Some("") | Some("all") => None,
            Some(s @ ("succeeded" | "failed")) => Some(s),
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "status: {other:?} is not succeeded, failed or all"
                )));
            }
        };
        let keep = self.inner.settings.webhook_log_keep;
        if limit == 0 || limit > keep {
            return Err(ApiError::invalid(format!("limit: between 1 and {keep}")));
        }
        let rows = self
            .inner
            .state
            .read_log(ATTEMPTS, &endpoint.id, keep)
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .filter_map(|r| serde_json::from_str::<Attempt>(r).ok())
            .filter(|a| want.is_none_or(|w| a.status == w))
            .take(limit)
            .collect())
    }

    /// Delivers again one event (from the given-up list or history) or
    /// everything history holds after `since`.
    pub async fn replay(
        &self,
        tenant: &str,
        id: &str,
        body: ReplayRequest,
    ) -> Result<Replayed, ApiError> {
        let endpoint = self.load(tenant, id).await?;
        let filter = endpoint.filter().ok_or_else(|| {
            ApiError::new(Code::Internal, format!("webhook {id} has unreadable types"))
        })?;
        let events: Vec<(String, String, String, Box<RawValue>)> = match (body.event_id, body.since)
        {
            (Some(event_id), None) => {
                crate::event::check_identifier(&event_id)
                    .map_err(|r| ApiError::invalid(format!("event_id: {r}")))?;
                vec![self.find_event(tenant, &endpoint.id, &event_id).await?]
            }
            (None, Some(since)) => {
                crate::event::check_identifier(&since)
                    .map_err(|r| ApiError::invalid(format!("since: {r}")))?;
                let replay = self.inner.broker.history_after(tenant, &since, &filter);
                if !replay.recovered {
                    return Err(ApiError::new(
                        Code::NotFound,
                        format!(
                            "since: event {since} is no longer held in history (TC_HISTORY_MAX_EVENTS, TC_HISTORY_MAX_AGE): replay single events by event_id"
                        ),
                    ));
                }
                replay
                    .events
                    .iter()
                    .filter(|e| !e.event_type.starts_with("notification."))
                    .map(|e| {
                        (
                            e.id.clone(),
                            e.event_type.clone(),
                            e.trace_id.clone(),
                            deliver::envelope(e),
                        )
                    })
                    .collect()
            }
            _ => {
                return Err(ApiError::invalid(
                    "send either {\"event_id\": …} or {\"since\": …}",
                ));
            }
        };
        let now = clock::unix_millis();
        let jobs: Vec<Job> = events
            .iter()
            .map(|(event_id, event_type, trace_id, payload)| {
                Delivery {
                    endpoint: endpoint.id.clone(),
                    tenant: tenant.to_string(),
                    event_id: event_id.clone(),
                    event_type: event_type.clone(),
                    trace_id: trace_id.clone(),
                    payload: payload.clone(),
                    attempt: 1,
                    first_ms: now,
                }
                .job(now)
            })
            .collect();
        let count = jobs.len();
        self.inner.state.enqueue(jobs).await.map_err(unavailable)?;
        self.inner.wake.notify_one();
        Ok(Replayed {
            replayed: count,
            event_ids: events.into_iter().map(|e| e.0).collect(),
        })
    }

    /// One event by id: a given-up delivery of this endpoint keeps its
    /// body; otherwise history.
    async fn find_event(
        &self,
        tenant: &str,
        endpoint: &str,
        event_id: &str,
    ) -> Result<(String, String, String, Box<RawValue>), ApiError> {
        let dead = self
            .inner
            .state
            .read_log(DEAD, endpoint, self.inner.settings.webhook_log_keep)
            .await
            .map_err(unavailable)?;
        for row in dead {
            if let Ok(d) = serde_json::from_str::<Dead>(&row)
                && d.delivery.event_id == event_id
            {
                let d = d.delivery;
                return Ok((d.event_id, d.event_type, d.trace_id, d.payload));
            }
        }
        match self.inner.broker.history_event(tenant, event_id) {
            Some(e) => Ok((
                e.id.clone(),
                e.event_type.clone(),
                e.trace_id.clone(),
                deliver::envelope(&e),
            )),
            None => Err(ApiError::new(
                Code::NotFound,
                format!(
                    "event {event_id} is neither among this webhook's given-up deliveries nor in history"
                ),
            )),
        }
    }

    /// An event this module publishes (delivery trace, disabling, tests).
    fn make_event(
        &self,
        tenant: &str,
        event_type: &str,
        data: &impl Serialize,
        trace_id: &str,
    ) -> Result<event::Event, serde_json::Error> {
        event::internal(tenant, event_type, data, trace_id, SystemTime::now())
    }

    /// Publishes an event the service made (its id is new: no dedupe).
    fn publish(&self, tenant: &str, event_type: &str, data: &impl Serialize, trace_id: &str) {
        match self.make_event(tenant, event_type, data, trace_id) {
            Ok(e) => self.inner.broker.publish_minted(e),
            Err(e) => tracing::warn!(tenant, event_type, "not published: {e}"),
        }
    }

    /// The enqueuer: events from the tap become jobs, in committed batches.
    async fn enqueuer(self, mut rx: mpsc::Receiver<SharedEvent>, stop: CancellationToken) {
        let mut batch = Vec::with_capacity(512);
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, 512) => n,
                () = stop.cancelled() => {
                    // Nothing is published any more: write what is left.
                    rx.close();
                    rx.recv_many(&mut batch, usize::MAX).await
                }
            };
            if n == 0 {
                return;
            }
            let (jobs, requested) = self.jobs_for(&batch).await;
            batch.clear();
            let mut wait = Duration::from_millis(100);
            // Retried until written: the channel behind holds the rest.
            while let Err(e) = self.inner.state.enqueue(jobs.clone()).await {
                tracing::warn!("webhook deliveries not yet written, retrying in {wait:?}: {e}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            self.inner.wake.notify_one();
            let events = requested
                .iter()
                .filter_map(|d| {
                    let data = deliver::Requested {
                        webhook_id: &d.endpoint,
                        event_id: &d.event_id,
                        event_type: &d.event_type,
                        attempt: 0,
                        status: "pending",
                    };
                    self.make_event(&d.tenant, "notification.requested", &data, &d.trace_id)
                        .inspect_err(|e| tracing::warn!(tenant = %d.tenant, "notification.requested not published: {e}"))
                        .ok()
                })
                .collect();
            self.inner.broker.publish_minted_many(events);
        }
    }

    /// One job per (event, endpoint that wants it); an endpoint at its
    /// pending limit gets its delivery given up at once instead.
    async fn jobs_for(&self, events: &[SharedEvent]) -> (Vec<Job>, Vec<Delivery>) {
        let now = clock::unix_millis();
        // The endpoints that want each event, from one look at the cache.
        let mut wanted: Vec<(&SharedEvent, Arc<Cached>)> = Vec::with_capacity(events.len());
        {
            let cache = lock_read(&self.inner.cache);
            for event in events {
                for cached in cache.get(&event.tenant_id).into_iter().flatten() {
                    if cached.wants(&event.event_type) {
                        wanted.push((event, Arc::clone(cached)));
                    }
                }
            }
        }
        let mut jobs = Vec::with_capacity(wanted.len());
        let mut deliveries = Vec::with_capacity(wanted.len());
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for (event, cached) in &wanted {
            let id = cached.endpoint.id.as_str();
            let delivery = Delivery::new(id, event, 1);
            let pending = match counts.get(id) {
                Some(n) => *n,
                None => self.inner.state.queue_len(id).await.unwrap_or(0),
            };
            if pending >= self.inner.settings.webhook_max_pending {
                deliver::give_up(
                    self,
                    delivery,
                    "pending limit (TC_WEBHOOK_MAX_PENDING) reached: delivery given up; replay it when the endpoint has caught up",
                )
                .await;
                continue;
            }
            counts.insert(id, pending + 1);
            jobs.push(delivery.job(now));
            deliveries.push(delivery);
        }
        (jobs, deliveries)
    }
}

/// An endpoint id is `we_` and hex: anything else is simply not found.
fn endpoint_id_invalid(id: &str) -> bool {
    !(id.starts_with("we_") && id.len() <= 64 && id[3..].bytes().all(|b| b.is_ascii_hexdigit()))
}

fn format_ms(ms: u64) -> String {
    clock::format_timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

#[derive(Debug, Serialize)]
pub struct Rotated {
    pub secret: String,
    pub previous_expires_at: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    pub event_id: Option<String>,
    pub since: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Replayed {
    pub replayed: usize,
    pub event_ids: Vec<String>,
}

/// The broker's hook: locally accepted events that some endpoint wants.
struct Tap {
    tx: mpsc::Sender<SharedEvent>,
    inner: Arc<Inner>,
    warning: clock::OncePerSecond,
}

impl Persist for Tap {
    fn offer(&self, event: &SharedEvent) {
        if event.event_type.starts_with("notification.") {
            return;
        }
        let wanted = lock_read(&self.inner.cache)
            .get(&event.tenant_id)
            .is_some_and(|eps| eps.iter().any(|c| c.wants(&event.event_type)));
        if !wanted {
            return;
        }
        if self.tx.try_send(Arc::clone(event)).is_err() {
            self.inner.metrics.dropped.inc();
            if self.warning.due() {
                tracing::error!(
                    tenant = %event.tenant_id,
                    event_id = %event.id,
                    trace_id = %event.trace_id,
                    "webhook queue full (TC_WEBHOOK_QUEUE): event not delivered as a webhook; replay it from history"
                );
            }
        }
    }
}

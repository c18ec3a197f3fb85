//! The in-process broker: dispatch in per-type order, the dedupe window of
//! recently dispatched ids, subscriptions with bounded buffers, and the
//! per-tenant history ring that resumes replay from.
//!
//! Dispatch is synchronous in the publish path: when `publish` returns, every
//! matching subscriber's buffer holds the event. Each tenant has one lock;
//! appending to its history and handing the event to its subscribers happen
//! under it, so every subscriber sees a tenant's events in acceptance order
//! (which is per-type order, and more). Handing over is a `try_send` into a
//! bounded channel, so a slow subscriber costs the publisher nothing: when
//! its buffer is full it is dropped, and its stream ends telling it the last
//! id it was sent.
//!
//! The locks are `std::sync::Mutex`: every critical section is short, never
//! awaits, and is on the publish hot path, where an async mutex would cost a
//! future per event for nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

use foldhash::quality::RandomState;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_stream::Stream;

use crate::event::{Event, SharedEvent, validate_type};

/// Limits of the in-process broker. Defaults are documented in the README.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Most events kept per tenant for resume.
    pub history_max_events: usize,
    /// Oldest event kept per tenant for resume.
    pub history_max_age: Duration,
    /// Most bytes of events kept per tenant for resume.
    pub history_max_bytes: usize,
    /// Most (tenant, id) pairs remembered to drop retried publishes.
    pub dedupe_max_ids: usize,
    /// How long a dispatched id is remembered.
    pub dedupe_max_age: Duration,
    /// Events buffered per subscriber before it counts as too slow.
    pub subscriber_buffer: usize,
    /// On resume, also replay held events accepted up to this long before
    /// the resume point. Events reach instances in different orders; with
    /// several instances this covers what another instance's subscriber
    /// had not yet seen. Zero for a single instance.
    pub resume_margin: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            history_max_events: 10_000,
            history_max_age: Duration::from_secs(3600),
            history_max_bytes: 64 << 20,
            dedupe_max_ids: 100_000,
            dedupe_max_age: Duration::from_secs(600),
            subscriber_buffer: 1024,
            resume_margin: Duration::ZERO,
        }
    }
}

/// Most filters one subscription may carry.
pub const MAX_FILTERS: usize = 64;

/// Which event types a subscriber wants: exact types and prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeFilter {
    exact: Vec<String>,
    /// Stored with the trailing dot: `cost.*` is kept as `cost.`.
    prefixes: Vec<String>,
}

/// A filter pattern that is neither an event type nor a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "types[{index}]: {pattern:?} is neither an event type (cost.updated) nor a prefix (cost.*)"
    )]
    Pattern { index: usize, pattern: String },
    #[error("types: {len} filters is more than the limit of {MAX_FILTERS}")]
    TooMany { len: usize },
}

impl TypeFilter {
    /// Every type.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses patterns: `cost.updated` (exact), `cost.*` or `ml.training.*`
    /// (prefix), `*` (everything). No patterns means everything.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, FilterError> {
        if patterns.len() > MAX_FILTERS {
            return Err(FilterError::TooMany {
                len: patterns.len(),
            });
        }
        let mut filter = Self::default();
        for (index, pattern) in patterns.iter().enumerate() {
            let pattern = pattern.as_ref().trim();
            let bad = || FilterError::Pattern {
                index,
                pattern: pattern.chars().take(140).collect(),
            };
            if pattern == "*" {
                return Ok(Self::all());
            }
            if let Some(prefix) = pattern.strip_suffix(".*") {
                // "cost" alone is a valid first word; check it as if a type.
                validate_type(&format!("{prefix}.x")).map_err(|_| bad())?;
                filter.prefixes.push(format!("{prefix}."));
            } else {
                validate_type(pattern).map_err(|_| bad())?;
                filter.exact.push(pattern.to_string());
            }
        }
        Ok(filter)
    }

    /// The patterns this filter was parsed from; `["*"]` for every type.
    pub fn patterns(&self) -> Vec<String> {
        if self.is_all() {
            return vec!["*".into()];
        }
        self.exact
            .iter()
            .cloned()
            .chain(self.prefixes.iter().map(|p| format!("{p}*")))
            .collect()
    }

    pub fn is_all(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    pub fn matches(&self, event_type: &str) -> bool {
        self.is_all()
            || self.exact.iter().any(|t| t == event_type)
            || self.prefixes.iter().any(|p| event_type.starts_with(p))
    }
}

/// Whose events a subscription follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    One(String),
    /// Every tenant (service tokens with the all-tenants scope).
    All,
}

/// The answer to one event of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub id: String,
    /// Recently dispatched already: acknowledged, not delivered again.
    pub duplicate: bool,
}

/// Counters for metrics (registered by [`crate::metrics`]) and tests.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Events accepted and dispatched.
    pub published: Counter,
    /// Publishes acknowledged as duplicates and not delivered.
    pub duplicates: Counter,
    /// Events handed to subscriber buffers.
    pub delivered: Counter,
    /// Subscribers dropped because their buffer was full.
    pub slow_subscribers_dropped: Counter,
    /// Events accepted by other instances and delivered here.
    pub relayed: Counter,
}

/// Where accepted events go after local dispatch (the Redis writer).
/// `offer` is called in the publish path under the tenant's lock, so it
/// sees each tenant's events in order; it must not block.
pub trait Persist: Send + Sync {
    fn offer(&self, event: &SharedEvent);
}

/// A cheap handle to the broker; clone it freely.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

struct Shared {
    config: BrokerConfig,
    tenants: RwLock<HashMap<String, Arc<Mutex<TenantState>>>>,
    /// Subscribers to every tenant. Locked after (never before) a tenant lock.
    all_tenants: Mutex<Vec<Subscriber>>,
    dedupe: Mutex<Dedupe>,
    next_subscriber: AtomicU64,
    closed: AtomicBool,
    stats: Stats,
    persist: std::sync::OnceLock<Box<dyn Persist>>,
}

struct TenantState {
    history: History,
    subscribers: Vec<Subscriber>,
}

struct Subscriber {
    id: u64,
    filter: TypeFilter,
    tx: mpsc::Sender<SharedEvent>,
    overflowed: Arc<AtomicBool>,
}

impl Subscriber {
    /// Hands `event` over if it matches. Returns false when this subscriber
    /// must be removed (gone, or too slow).
    fn offer(&self, event: &SharedEvent, stats: &Stats) -> bool {
        if !self.filter.matches(&event.event_type) {
            return !self.tx.is_closed();
        }
        match self.tx.try_send(Arc::clone(event)) {
            Ok(()) => {
                stats.delivered.inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Release);
                stats.slow_subscribers_dropped.inc();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// Recently dispatched (tenant, id) pairs, bounded by count and age: a set
/// for lookups and a queue in dispatch order, so the oldest pair is always
/// at the front and leaves first. (An LRU cache does the same with a linked
/// list node per entry; profiled on the publish path it cost 5% of the
/// broker's time, this costs a fraction of that.)
///
/// A pair is kept as a 128-bit hash with random seeds rather than two
/// strings: no allocation on the publish path and 16 bytes an entry; with
/// seeds unknown outside the process nobody can aim a collision, and an
/// accidental one (2^-128) never happens.
struct Dedupe {
    seen: HashSet<u128, BuildHasherDefault<KeyHasher>>,
    order: VecDeque<(u128, Instant)>,
    max_ids: usize,
    max_age: Duration,
    keys: (RandomState, RandomState),
}

/// The keys are already uniform random hashes: their low bits are a
/// perfectly good table hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

impl Dedupe {
    fn new(max_ids: usize, max_age: Duration) -> Self {
        Self {
            seen: HashSet::default(),
            order: VecDeque::new(),
            max_ids: max_ids.max(1),
            max_age,
            keys: (RandomState::default(), RandomState::default()),
        }
    }

    fn key(&self, tenant: &str, id: &str) -> u128 {
        let half = |state: &RandomState| {
            let mut h = state.build_hasher();
            tenant.hash(&mut h);
            id.hash(&mut h);
            h.finish()
        };
        (u128::from(half(&self.keys.0)) << 64) | u128::from(half(&self.keys.1))
    }

    /// Records the pair; false when it was already recorded.
    fn first_sighting(&mut self, tenant: &str, id: &str, now: Instant) -> bool {
        while let Some(&(key, at)) = self.order.front() {
            if self.order.len() < self.max_ids && now.duration_since(at) < self.max_age {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&key);
        }
        let key = self.key(tenant, id);
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back((key, now));
        true
    }
}

/// One tenant's recent events, oldest first, bounded by count, bytes and age.
struct History {
    events: VecDeque<(Instant, SharedEvent)>,
    bytes: usize,
}

/// What the history holds after a given id.
pub struct Replay {
    pub events: Vec<SharedEvent>,
    /// True when the id was found, so `events` is everything after it.
    pub recovered: bool,
}

impl History {
    fn new() -> Self {
        Self {
            events: VecDeque::new(),
            bytes: 0,
        }
    }

    fn push(&mut self, event: SharedEvent, now: Instant, config: &BrokerConfig) {
        self.bytes += event.size_bytes();
        self.events.push_back((now, event));
        self.trim(now, config);
    }

    fn trim(&mut self, now: Instant, config: &BrokerConfig) {
        while let Some((at, event)) = self.events.front() {
            let over = self.events.len() > config.history_max_events
                || self.bytes > config.history_max_bytes
                || now.duration_since(*at) > config.history_max_age;
            if !over {
                break;
            }
            self.bytes -= event.size_bytes();
            self.events.pop_front();
        }
    }

    /// Events after `since_id` that match `filter`. When `since_id` is not
    /// held (too old, or never seen here), everything held is returned and
    /// `recovered` is false: the subscriber should refetch its state.
    fn after(&self, since_id: &str, filter: &TypeFilter, margin: Duration) -> Replay {
        match self.events.iter().rposition(|(_, e)| e.id == since_id) {
            Some(pos) => Replay {
                events: self.matching(self.resume_start(pos, margin), filter),
                recovered: true,
            },
            None => Replay {
                events: self.matching(0, filter),
                recovered: false,
            },
        }
    }

    /// Where a replay after the event at `pos` starts: just after it, or
    /// earlier to include events accepted within `margin` before it.
    fn resume_start(&self, pos: usize, margin: Duration) -> usize {
        if margin.is_zero() {
            return pos + 1;
        }
        let Some(since) = self
            .events
            .get(pos)
            .and_then(|(_, e)| crate::clock::parse_timestamp(&e.timestamp))
        else {
            return pos + 1;
        };
        // Timestamps share one fixed format, so they compare as text.
        let from = crate::clock::format_timestamp(since - margin);
        let first = self
            .events
            .iter()
            .position(|(_, e)| e.timestamp >= from)
            .unwrap_or(pos + 1);
        first.min(pos + 1)
    }

    /// Events after `since_id` up to and including `until_id`. `until_id`
    /// `None`, or no longer held, means nothing up to now: every event held
    /// is newer than it.
    fn between(
        &self,
        since_id: &str,
        until_id: Option<&str>,
        filter: &TypeFilter,
        margin: Duration,
    ) -> Replay {
        let position = |id: &str| self.events.iter().rposition(|(_, e)| e.id == id);
        let since = position(since_id);
        let end = until_id.and_then(position).map_or(0, |p| p + 1);
        let start = since.map_or(0, |p| self.resume_start(p, margin));
        Replay {
            events: if start < end {
                self.matching_range(start..end, filter)
            } else {
                Vec::new()
            },
            recovered: since.is_some() || until_id == Some(since_id),
        }
    }

    fn matching(&self, start: usize, filter: &TypeFilter) -> Vec<SharedEvent> {
        self.matching_range(start..self.events.len(), filter)
    }

    fn matching_range(
        &self,
        range: std::ops::Range<usize>,
        filter: &TypeFilter,
    ) -> Vec<SharedEvent> {
        self.events
            .range(range)
            .filter(|(_, e)| filter.matches(&e.event_type))
            .map(|(_, e)| Arc::clone(e))
            .collect()
    }
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                dedupe: Mutex::new(Dedupe::new(config.dedupe_max_ids, config.dedupe_max_age)),
                config,
                tenants: RwLock::new(HashMap::new()),
                all_tenants: Mutex::new(Vec::new()),
                next_subscriber: AtomicU64::new(1),
                closed: AtomicBool::new(false),
                stats: Stats::default(),
                persist: std::sync::OnceLock::new(),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Dispatches validated events, in order, to every matching subscriber
    /// and into history. An id already dispatched for the same tenant within
    /// the dedupe window is acknowledged as a duplicate and not delivered.
    pub fn publish(&self, events: Vec<Event>) -> Vec<Outcome> {
        events.into_iter().map(|e| self.publish_one(e)).collect()
    }

    pub fn publish_one(&self, event: Event) -> Outcome {
        let shared = &self.shared;
        if !lock(&shared.dedupe).first_sighting(&event.tenant_id, &event.id, Instant::now()) {
            shared.stats.duplicates.inc();
            return Outcome {
                id: event.id,
                duplicate: true,
            };
        }
        shared.stats.published.inc();
        let event = Arc::new(event);
        self.dispatch(&event, shared.persist.get().map(|p| p.as_ref()));
        Outcome {
            id: event.id.clone(),
            duplicate: false,
        }
    }

    /// Delivers an event that another instance accepted (read back from
    /// Redis): dispatched and kept in history like a local one, but not
    /// persisted again. An id already dispatched here (this instance's own
    /// event, or one relayed before) is dropped. Returns whether it was new.
    pub fn relay(&self, event: Event) -> bool {
        let shared = &self.shared;
        if !lock(&shared.dedupe).first_sighting(&event.tenant_id, &event.id, Instant::now()) {
            return false;
        }
        shared.stats.relayed.inc();
        self.dispatch(&Arc::new(event), None);
        true
    }

    /// Sends `persist` a copy of every locally accepted event from now on.
    /// Set once, at start-up.
    pub fn set_persist(&self, persist: Box<dyn Persist>) {
        if self.shared.persist.set(persist).is_err() {
            tracing::warn!("a persistence sink was already set");
        }
    }

    /// History, subscribers and persistence, under the tenant's lock so
    /// every one of them sees the tenant's events in the same order.
    fn dispatch(&self, event: &SharedEvent, persist: Option<&dyn Persist>) {
        let shared = &self.shared;
        let tenant = self.tenant(&event.tenant_id);
        let mut state = lock(&tenant);
        state
            .history
            .push(Arc::clone(event), Instant::now(), &shared.config);
        state.subscribers.retain(|s| s.offer(event, &shared.stats));
        let mut everyone = lock(&shared.all_tenants);
        if !everyone.is_empty() {
            everyone.retain(|s| s.offer(event, &shared.stats));
        }
        drop(everyone);
        if let Some(persist) = persist {
            persist.offer(event);
        }
    }

    /// Follows `scope`'s events matching `filter`. With `since_id`, history
    /// after that id is replayed first; the replay snapshot and the live
    /// registration are taken under the same lock, so there is no gap and
    /// no duplicate at the seam.
    pub fn subscribe(
        &self,
        scope: TenantScope,
        filter: TypeFilter,
        since_id: Option<&str>,
    ) -> Subscription {
        let shared = &self.shared;
        let (tx, rx) = mpsc::channel(shared.config.subscriber_buffer.max(1));
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber {
            id,
            filter: filter.clone(),
            tx,
            overflowed: Arc::clone(&overflowed),
        };
        let mut replay = Replay {
            events: Vec::new(),
            recovered: true,
        };
        let mut history_tail = None;
        match &scope {
            TenantScope::One(tenant) => {
                let tenant = self.tenant(tenant);
                let mut state = lock(&tenant);
                state.history.trim(Instant::now(), &shared.config);
                history_tail = state.history.events.back().map(|(_, e)| e.id.clone());
                if let Some(since) = since_id {
                    replay = state
                        .history
                        .after(since, &filter, shared.config.resume_margin);
                }
                if !shared.closed.load(Ordering::Acquire) {
                    state.subscribers.push(subscriber);
                }
            }
            TenantScope::All => {
                if !shared.closed.load(Ordering::Acquire) {
                    lock(&shared.all_tenants).push(subscriber);
                }
            }
        }
        Subscription {
            replay: replay.events.into_iter(),
            recovered: since_id.map(|_| replay.recovered),
            history_tail,
            rx,
            overflowed,
            last_sent: None,
            finished: false,
            deadline: None,
            _guard: Unsubscribe {
                broker: Arc::downgrade(shared),
                scope,
                id,
            },
        }
    }

    /// Events of `tenant` after `since_id`, up to and including `until_id`,
    /// that match `filter`. For a consumer that follows a tenant through its
    /// own subscription and fans out to late joiners (the Socket.IO edge):
    /// `until_id` is the last event it forwarded, so a joiner gets from
    /// history exactly what it missed of what was already forwarded, and the
    /// rest live. `recovered` is false when `since_id` is no longer held.
    pub fn history_between(
        &self,
        tenant: &str,
        since_id: &str,
        until_id: Option<&str>,
        filter: &TypeFilter,
    ) -> Replay {
        let tenant = self.tenant(tenant);
        let mut state = lock(&tenant);
        state.history.trim(Instant::now(), &self.shared.config);
        state
            .history
            .between(since_id, until_id, filter, self.shared.config.resume_margin)
    }

    /// Ends every subscription (their streams see `Closed`) and refuses new
    /// ones. Publishing still works, so nothing accepted is lost during a
    /// graceful shutdown.
    pub fn close(&self) {
        let shared = &self.shared;
        shared.closed.store(true, Ordering::Release);
        let tenants: Vec<_> = read(&shared.tenants).values().cloned().collect();
        for tenant in tenants {
            lock(&tenant).subscribers.clear();
        }
        lock(&shared.all_tenants).clear();
    }

    /// Number of live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        let tenants: Vec<_> = read(&self.shared.tenants).values().cloned().collect();
        tenants
            .iter()
            .map(|t| lock(t).subscribers.len())
            .sum::<usize>()
            + lock(&self.shared.all_tenants).len()
    }

    fn tenant(&self, tenant_id: &str) -> Arc<Mutex<TenantState>> {
        if let Some(t) = read(&self.shared.tenants).get(tenant_id) {
            return Arc::clone(t);
        }
        let mut tenants = self
            .shared
            .tenants
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(tenants.entry(tenant_id.to_string()).or_insert_with(|| {
            Arc::new(Mutex::new(TenantState {
                history: History::new(),
                subscribers: Vec::new(),
            }))
        }))
    }
}

/// Locks a mutex, ignoring poisoning: the broker's state stays consistent
/// across a panicking holder because every critical section is a few
/// infallible container operations.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes a subscriber when its subscription is dropped, so an idle
/// tenant does not hold senders of departed subscribers.
struct Unsubscribe {
    broker: Weak<Shared>,
    scope: TenantScope,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let Some(shared) = self.broker.upgrade() else {
            return;
        };
        match &self.scope {
            TenantScope::One(tenant) => {
                let state = read(&shared.tenants).get(tenant).cloned();
                if let Some(state) = state {
                    lock(&state).subscribers.retain(|s| s.id != self.id);
                }
            }
            TenantScope::All => lock(&shared.all_tenants).retain(|s| s.id != self.id),
        }
    }
}

/// What a subscription yields next.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(SharedEvent),
    /// The subscriber fell more than its buffer behind and was dropped.
    /// `last_id` is the last event it was sent; resume after it.
    Lagged {
        last_id: Option<String>,
    },
    /// The broker is shutting down. `last_id` as for `Lagged`.
    Closed {
        last_id: Option<String>,
    },
    /// The subscription's deadline (its token's expiry) passed.
    Expired {
        last_id: Option<String>,
    },
}

/// A live subscription: the replay, then live events, then at most one
/// `Lagged` or `Closed`, then the end.
pub struct Subscription {
    replay: std::vec::IntoIter<SharedEvent>,
    /// `Some` when a resume was asked for: whether the history reached back.
    pub recovered: Option<bool>,
    /// The newest event in the tenant's history when this subscription
    /// started: everything after it arrives live (or in the replay).
    pub history_tail: Option<String>,
    rx: mpsc::Receiver<SharedEvent>,
    overflowed: Arc<AtomicBool>,
    last_sent: Option<SharedEvent>,
    finished: bool,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _guard: Unsubscribe,
}

impl Subscription {
    /// Events replayed from history before live events.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// Ends the subscription with [`Delivery::Expired`] at `deadline` (the
    /// subscriber's token expiry), replayed events or not.
    pub fn with_deadline(mut self, deadline: tokio::time::Instant) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
        self
    }

    fn last_id(&self) -> Option<String> {
        self.last_sent.as_ref().map(|e| e.id.clone())
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.finished = true;
            return Poll::Ready(Some(Delivery::Expired {
                last_id: this.last_id(),
            }));
        }
        if let Some(event) = this.replay.next() {
            this.last_sent = Some(Arc::clone(&event));
            return Poll::Ready(Some(Delivery::Event(event)));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                this.last_sent = Some(Arc::clone(&event));
                Poll::Ready(Some(Delivery::Event(event)))
            }
            // Every sender is gone: the broker dropped this subscriber
            // because it was too slow, or because it is closing.
            Poll::Ready(None) => {
                this.finished = true;
                let last_id = this.last_id();
                Poll::Ready(Some(if this.overflowed.load(Ordering::Acquire) {
                    Delivery::Lagged { last_id }
                } else {
                    Delivery::Closed { last_id }
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn event(tenant: &str, id: &str, event_type: &str) -> Event {
        Event {
            id: id.into(),
            event_type: event_type.into(),
            tenant_id: tenant.into(),
            data: serde_json::value::RawValue::from_string("{}".into()).expect("json"),
            timestamp: String::new(),
            trace_id: String::new(),
        }
    }

    #[test]
    fn filters() {
        let f = TypeFilter::parse(&["cost.*", "alert.created"]).expect("valid");
        assert!(f.matches("cost.updated"));
        assert!(f.matches("cost.forecast.generated"));
        assert!(f.matches("alert.created"));
        assert!(!f.matches("alert.resolved"));
        assert!(!f.matches("costs.updated"));
        assert!(TypeFilter::parse(&["*"]).expect("valid").is_all());
        assert!(TypeFilter::parse::<&str>(&[]).expect("valid").is_all());
        assert!(
            TypeFilter::parse(&["ml.training.*"])
                .expect("valid")
                .matches("ml.training.started")
        );
        for bad in ["Cost.*", "cost", "cost.", ".*", "cost.**", "*.updated"] {
            assert!(TypeFilter::parse(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn dedupe_bounds() {
        let mut d = Dedupe::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(d.first_sighting("t", "a", t0));
        assert!(!d.first_sighting("t", "a", t0));
        assert!(d.first_sighting("u", "a", t0), "ids are per tenant");
        assert!(d.first_sighting("t", "b", t0));
        assert!(d.first_sighting("t", "a", t0), "evicted by count");
        let later = t0 + Duration::from_secs(11);
        assert!(d.first_sighting("t", "b", later), "evicted by age");
    }

    #[test]
    fn history_bounds() {
        let config = BrokerConfig {
            history_max_events: 3,
            ..Default::default()
        };
        let mut h = History::new();
        let now = Instant::now();
        for i in 0..5 {
            h.push(Arc::new(event("t", &i.to_string(), "a.b")), now, &config);
        }
        let ids: Vec<_> = h.events.iter().map(|(_, e)| e.id.clone()).collect();
        assert_eq!(ids, ["2", "3", "4"]);
        let r = h.after("3", &TypeFilter::all(), Duration::ZERO);
        assert!(r.recovered);
        assert_eq!(r.events.len(), 1);
        let r = h.after("0", &TypeFilter::all(), Duration::ZERO);
        assert!(!r.recovered);
        assert_eq!(r.events.len(), 3);
        let b = |since, until| {
            let r = h.between(since, until, &TypeFilter::all(), Duration::ZERO);
            let ids: Vec<String> = r.events.iter().map(|e| e.id.clone()).collect();
            (ids, r.recovered)
        };
        assert_eq!(b("2", Some("4")), (vec!["3".into(), "4".into()], true));
        assert_eq!(b("4", Some("3")), (vec![], true), "since after until");
        assert_eq!(b("0", Some("3")), (vec!["2".into(), "3".into()], false));
        assert_eq!(b("0", None), (vec![], false), "nothing forwarded yet");
        assert_eq!(
            b("1", Some("1")),
            (vec![], true),
            "up to date, even if evicted"
        );
        assert_eq!(
            b("3", Some("gone")),
            (vec![], true),
            "until evicted: all held is newer"
        );
        let aged = BrokerConfig {
            history_max_age: Duration::from_secs(1),
            ..config
        };
        h.trim(now + Duration::from_secs(2), &aged);
        assert!(h.events.is_empty());
        assert_eq!(h.bytes, 0);
    }

    #[tokio::test]
    async fn slow_subscriber_is_dropped_with_last_id() {
        let broker = Broker::new(BrokerConfig {
            subscriber_buffer: 2,
            ..Default::default()
        });
        let mut slow = broker.subscribe(TenantScope::One("t".into()), TypeFilter::all(), None);
        for i in 0..5 {
            broker.publish_one(event("t", &format!("e{i}"), "a.b"));
        }
        let mut got = Vec::new();
        while let Some(d) = slow.next().await {
            got.push(d);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            matches!(&got[2], Delivery::Lagged { last_id: Some(id) } if id == "e1"),
            "{got:?}"
        );
        assert_eq!(broker.stats().slow_subscribers_dropped.get(), 1);
    }

    #[tokio::test]
    async fn close_ends_streams_and_drop_unsubscribes() {
        let broker = Broker::new(BrokerConfig::default());
        let mut sub = broker.subscribe(TenantScope::One("t".into()), TypeFilter::all(), None);
        let other = broker.subscribe(TenantScope::All, TypeFilter::all(), None);
        assert_eq!(broker.subscriber_count(), 2);
        drop(other);
        assert_eq!(broker.subscriber_count(), 1);
        broker.publish_one(event("t", "x", "a.b"));
        broker.close();
        assert!(matches!(sub.next().await, Some(Delivery::Event(_))));
        assert!(matches!(
            sub.next().await,
            Some(Delivery::Closed { last_id: Some(id) }) if id == "x"
        ));
        assert!(sub.next().await.is_none());
    }
}

//! Dispatch: the tenant map, per-tenant order, and the publish, relay and
//! subscribe paths.
//!
//! Each tenant has one lock; appending to its history and handing the event
//! to its subscribers happen under it, so every subscriber sees a tenant's
//! events in acceptance order (which is per-type order, and more), and a
//! subscription's replay snapshot and live registration are taken under the
//! same lock, so there is no gap and no duplicate at the resume seam.
//!
//! The locks are `std::sync::Mutex`: every critical section is short, never
//! awaits, and is on the publish hot path, where an async mutex would cost a
//! future per event for nothing.
//!
//! A tenant with no subscriber and no history left is released from the
//! map (at once when its last subscriber leaves an empty history, else by
//! [`Broker::release_idle`] once its history has aged out), so tenant ids
//! seen once do not hold memory forever. A released state is marked under
//! its own lock; whoever finds it marked looks the tenant up again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::dedupe::Dedupe;
use super::filter::TypeFilter;
use super::history::{History, Page, Replay, Span};
use super::subscription::{Subscriber, Subscription};
use super::{BrokerConfig, Outcome, Persist, Stats};
use crate::event::{Event, SharedEvent};
use crate::tenant::TenantScope;

/// Most events [`Broker::publish_minted_many`] dispatches under one taking
/// of a tenant's lock.
const LOCK_RUN: usize = 64;

/// A subscription refused because its tenant has as many as allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "tenant {tenant} has {limit} subscriptions open, the most TC_MAX_SUBSCRIBERS_PER_TENANT allows: close one first"
)]
pub struct TooManySubscribers {
    pub tenant: String,
    pub limit: usize,
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
    persist: OnceLock<Vec<Box<dyn Persist>>>,
    /// Given every dispatched event, local or relayed (the projections).
    observers: OnceLock<Vec<Box<dyn Persist>>>,
    /// When this broker started keeping events.
    started: SystemTime,
}

struct TenantState {
    history: History,
    subscribers: Vec<Subscriber>,
    /// Removed from the map: look the tenant up again.
    released: bool,
}

impl TenantState {
    fn idle(&self) -> bool {
        self.subscribers.is_empty() && self.history.is_empty()
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
                persist: OnceLock::new(),
                observers: OnceLock::new(),
                started: SystemTime::now(),
            }),
        }
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
        let id = event.id.clone();
        self.publish_minted(event);
        Outcome {
            id,
            duplicate: false,
        }
    }

    /// Publishes an event whose id this broker has just minted (the
    /// webhook trace events): the id is new by construction, so it skips
    /// the dedupe window, which exists for publishers' retries. A
    /// publisher that later sends the same id is accepted, as with any id
    /// outside the window.
    pub fn publish_minted(&self, event: Event) {
        self.shared.stats.published.inc();
        let event = Arc::new(event);
        self.dispatch(&event, self.shared.persist.get().map(Vec::as_slice), true);
    }

    /// Delivers an event that another instance accepted (read back from
    /// Redis): dispatched and kept in history like a local one, but not
    /// persisted again. An id already dispatched here (this instance's own
    /// event, or one relayed before) is dropped. Returns whether it was new.
    pub fn relay(&self, event: Event) -> bool {
        self.relay_to(event, true)
    }

    /// [`Broker::relay`], but not offered to the observers: for events
    /// read back while warming history at start, which the projections
    /// restored from their own records.
    pub fn relay_unobserved(&self, event: Event) -> bool {
        self.relay_to(event, false)
    }

    fn relay_to(&self, event: Event, observed: bool) -> bool {
        let shared = &self.shared;
        if !lock(&shared.dedupe).first_sighting(&event.tenant_id, &event.id, Instant::now()) {
            return false;
        }
        shared.stats.relayed.inc();
        self.dispatch(&Arc::new(event), None, observed);
        true
    }

    /// Sends each of `persist` (the Redis writer, the webhook enqueuer) a
    /// copy of every locally accepted event from now on. Set once, at
    /// start-up, before anything is published.
    pub fn set_persist(&self, persist: Vec<Box<dyn Persist>>) {
        if self.shared.persist.set(persist).is_err() {
            tracing::warn!("persistence sinks were already set");
        }
    }

    /// Hands each of `observers` (the projections) every event dispatched
    /// from now on, accepted here or relayed from another instance. Set
    /// once, at start-up.
    pub fn set_observers(&self, observers: Vec<Box<dyn Persist>>) {
        if self.shared.observers.set(observers).is_err() {
            tracing::warn!("observers were already set");
        }
    }

    /// [`Broker::publish_minted`] for several events (a batch of delivery
    /// trace events): events of one tenant that follow each other are
    /// dispatched under one taking of its lock, at most [`LOCK_RUN`] at a
    /// time so that publishers of that tenant do not wait long behind it.
    pub fn publish_minted_many(&self, events: Vec<Event>) {
        let shared = &self.shared;
        let persist = shared.persist.get().map(Vec::as_slice);
        let mut events = events.into_iter().map(Arc::new).peekable();
        while let Some(first) = events.next() {
            self.with_tenant(&first.tenant_id, |state| {
                shared.stats.published.inc();
                self.dispatch_locked(state, &first, persist, true);
                for _ in 1..LOCK_RUN {
                    let Some(next) = events.next_if(|e| e.tenant_id == first.tenant_id) else {
                        break;
                    };
                    shared.stats.published.inc();
                    self.dispatch_locked(state, &next, persist, true);
                }
            });
        }
    }

    /// History, subscribers and persistence, under the tenant's lock so
    /// every one of them sees the tenant's events in the same order.
    fn dispatch(&self, event: &SharedEvent, persist: Option<&[Box<dyn Persist>]>, observed: bool) {
        self.with_tenant(&event.tenant_id, |state| {
            self.dispatch_locked(state, event, persist, observed);
        });
    }

    fn dispatch_locked(
        &self,
        state: &mut TenantState,
        event: &SharedEvent,
        persist: Option<&[Box<dyn Persist>]>,
        observed: bool,
    ) {
        let shared = &self.shared;
        state
            .history
            .push(Arc::clone(event), Instant::now(), &shared.config);
        state.subscribers.retain(|s| s.offer(event, &shared.stats));
        let mut everyone = lock(&shared.all_tenants);
        if !everyone.is_empty() {
            everyone.retain(|s| s.offer(event, &shared.stats));
        }
        drop(everyone);
        for sink in persist.unwrap_or_default() {
            sink.offer(event);
        }
        let observers = shared.observers.get().filter(|_| observed);
        for observer in observers.map(Vec::as_slice).unwrap_or_default() {
            observer.offer(event);
        }
    }

    /// Follows `scope`'s events matching `filter`. With `since_id`, history
    /// after that id is replayed first; the replay snapshot and the live
    /// registration are taken under the same lock, so there is no gap and
    /// no duplicate at the seam. Refused when the tenant (or every-tenant
    /// scope) already has `max_subscribers_per_tenant` subscriptions.
    pub fn subscribe(
        &self,
        scope: TenantScope,
        filter: TypeFilter,
        since_id: Option<&str>,
    ) -> Result<Subscription, TooManySubscribers> {
        let limit = self.shared.config.max_subscribers_per_tenant;
        self.open(scope, filter, since_id, |held, scope| {
            if held >= limit {
                Err(TooManySubscribers {
                    tenant: scope.label().to_string(),
                    limit,
                })
            } else {
                Ok(())
            }
        })
    }

    /// Every event of `tenant`, after `since_id`: the broker's own
    /// consumers (the Socket.IO edge's per-tenant pump), not capped.
    pub fn follow(&self, tenant: &str, since_id: Option<&str>) -> Subscription {
        let uncapped = |_: usize, _: &TenantScope| Ok::<(), std::convert::Infallible>(());
        let Ok(subscription) = self.open(
            TenantScope::One(tenant.to_string()),
            TypeFilter::all(),
            since_id,
            uncapped,
        );
        subscription
    }

    fn open<E>(
        &self,
        scope: TenantScope,
        filter: TypeFilter,
        since_id: Option<&str>,
        admit: impl FnOnce(usize, &TenantScope) -> Result<(), E>,
    ) -> Result<Subscription, E> {
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
            TenantScope::One(tenant) => self.with_tenant(tenant, |state| {
                admit(state.subscribers.len(), &scope)?;
                state.history.trim(Instant::now(), &shared.config);
                history_tail = state.history.tail_id();
                if let Some(since) = since_id {
                    replay = state
                        .history
                        .after(since, &filter, shared.config.resume_margin);
                }
                if !shared.closed.load(Ordering::Acquire) {
                    state.subscribers.push(subscriber);
                }
                Ok(())
            })?,
            TenantScope::All => {
                let mut everyone = lock(&shared.all_tenants);
                admit(everyone.len(), &scope)?;
                if !shared.closed.load(Ordering::Acquire) {
                    everyone.push(subscriber);
                }
            }
        }
        Ok(Subscription {
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
        })
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
        let config = &self.shared.config;
        self.with_tenant(tenant, |state| {
            state.history.trim(Instant::now(), config);
            state
                .history
                .between(since_id, until_id, filter, config.resume_margin)
        })
    }

    /// Events of `tenant` held after `since_id` that match `filter`, exactly
    /// (no resume margin); `recovered` is false when `since_id` is not held.
    pub fn history_after(&self, tenant: &str, since_id: &str, filter: &TypeFilter) -> Replay {
        let config = &self.shared.config;
        self.with_tenant(tenant, |state| {
            state.history.trim(Instant::now(), config);
            state.history.after(since_id, filter, Duration::ZERO)
        })
    }

    /// A page of `tenant`'s held events matching `filter` (see
    /// [`History::page`]).
    pub fn history_page(
        &self,
        tenant: &str,
        since_id: Option<&str>,
        filter: &TypeFilter,
        limit: usize,
    ) -> Page {
        let config = &self.shared.config;
        self.with_tenant(tenant, |state| {
            state.history.trim(Instant::now(), config);
            state.history.page(since_id, filter, limit)
        })
    }

    /// `tenant`'s held events stamped from `from` to `until`, and whether
    /// history reaches back to `from`.
    pub fn history_span(&self, tenant: &str, from: SystemTime, until: SystemTime) -> Span {
        let config = &self.shared.config;
        let since = self.shared.started;
        self.with_tenant(tenant, |state| {
            state.history.trim(Instant::now(), config);
            state.history.span(from, until, since)
        })
    }

    /// The event of `tenant` with this id, if history still holds it.
    pub fn history_event(&self, tenant: &str, id: &str) -> Option<SharedEvent> {
        let config = &self.shared.config;
        self.with_tenant(tenant, |state| {
            state.history.trim(Instant::now(), config);
            state.history.find(id)
        })
    }

    /// Ends every subscription (their streams see `Closed`) and refuses new
    /// ones. Publishing still works, so nothing accepted is lost during a
    /// graceful shutdown.
    pub fn close(&self) {
        let shared = &self.shared;
        shared.closed.store(true, Ordering::Release);
        for tenant in self.tenant_states() {
            lock(&tenant).subscribers.clear();
        }
        lock(&shared.all_tenants).clear();
    }

    /// Whether [`Broker::close`] was called: the server is shutting down.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Number of live subscriptions.
    pub fn subscriber_count(&self) -> usize {
        self.tenant_states()
            .iter()
            .map(|t| lock(t).subscribers.len())
            .sum::<usize>()
            + lock(&self.shared.all_tenants).len()
    }

    /// Number of tenants the broker holds state for.
    pub fn tenant_count(&self) -> usize {
        read(&self.shared.tenants).len()
    }

    /// Trims every tenant's history to `now` and releases the tenants left
    /// with no subscriber and no history. Returns how many were released.
    /// Called periodically (every tenant is visited, under the map's write
    /// lock: publishes wait that long).
    pub fn release_idle(&self, now: Instant) -> usize {
        let config = &self.shared.config;
        let mut tenants = write(&self.shared.tenants);
        let before = tenants.len();
        tenants.retain(|_, state| {
            let mut state = lock(state);
            state.history.trim(now, config);
            state.released = state.idle();
            !state.released
        });
        before - tenants.len()
    }

    fn tenant_states(&self) -> Vec<Arc<Mutex<TenantState>>> {
        read(&self.shared.tenants).values().cloned().collect()
    }

    /// Runs `f` under the tenant's lock, creating the tenant if needed.
    fn with_tenant<R>(&self, tenant_id: &str, f: impl FnOnce(&mut TenantState) -> R) -> R {
        loop {
            let tenant = self.tenant(tenant_id);
            let mut state = lock(&tenant);
            if !state.released {
                return f(&mut state);
            }
        }
    }

    fn tenant(&self, tenant_id: &str) -> Arc<Mutex<TenantState>> {
        if let Some(t) = read(&self.shared.tenants).get(tenant_id) {
            return Arc::clone(t);
        }
        let mut tenants = write(&self.shared.tenants);
        Arc::clone(tenants.entry(tenant_id.to_string()).or_insert_with(|| {
            Arc::new(Mutex::new(TenantState {
                history: History::new(),
                subscribers: Vec::new(),
                released: false,
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

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes a subscriber when its subscription is dropped, so an idle
/// tenant does not hold senders of departed subscribers, and releases the
/// tenant if nothing else is left of it.
pub(super) struct Unsubscribe {
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
                let Some(state) = read(&shared.tenants).get(tenant).cloned() else {
                    return;
                };
                let idle = {
                    let mut state = lock(&state);
                    state.subscribers.retain(|s| s.id != self.id);
                    state.idle()
                };
                if idle {
                    // Map lock, then tenant lock: the order release_idle uses.
                    let mut tenants = write(&shared.tenants);
                    if let Some(state) = tenants.get(tenant) {
                        let mut state = lock(state);
                        if state.idle() {
                            state.released = true;
                            drop(state);
                            tenants.remove(tenant);
                        }
                    }
                }
            }
            TenantScope::All => lock(&shared.all_tenants).retain(|s| s.id != self.id),
        }
    }
}

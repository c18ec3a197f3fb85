//! Per-tenant read models built from dispatched events (local and relayed
//! alike, so every instance answers the same), for the MCP tools.
//!
//! The broker hands each dispatched event of a type a projection reads to
//! [`Observer::offer`], which only queues it (bounded, never blocking the
//! publish path); one task applies the queue to the models. A tenant's
//! models are reached only with its own tenant id.

pub mod cost;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::Persist;
use crate::clock;
use crate::event::SharedEvent;
use crate::state::State;

/// The state table of cost hours: (tenant, hour number) → the hour.
const COST_HOURS: &str = "cost_hours";
/// How often changed hours are written to the state store: what a crash
/// of every instance can take from the figures.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// Writes in flight at once while saving.
const SAVE_BATCH: usize = 128;

pub use cost::{AgentCosts, CostSummary, SummaryQuery, WorkloadCosts};

/// Events waiting to be applied, at most (`TC_PROJECTION_QUEUE`).
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectionSettings {
    /// Dispatched events waiting for the projections, at most; past it an
    /// event is left out of them (counted in
    /// `tc_projection_dropped_events_total` and logged).
    #[arg(long, env = "TC_PROJECTION_QUEUE", default_value_t = 65_536, value_parser = crate::config::parse::positive)]
    pub projection_queue: usize,
}

#[derive(Default)]
struct Metrics {
    applied: Counter,
    dropped: Counter,
    unreadable: Counter,
}

/// Every tenant's read models. Cheap to clone.
#[derive(Clone, Default)]
pub struct Projections {
    tenants: Arc<Mutex<HashMap<String, cost::TenantCosts>>>,
    /// Hours changed, and hours aged out, since the last save.
    unsaved: Arc<Mutex<Unsaved>>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Unsaved {
    changed: HashSet<(String, u64)>,
    removed: HashSet<(String, u64)>,
}

impl Projections {
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "projection_applied_events",
            "Events applied to the MCP projections",
            self.metrics.applied.clone(),
        );
        registry.register(
            "projection_dropped_events",
            "Events left out of the projections because their queue was full (TC_PROJECTION_QUEUE)",
            self.metrics.dropped.clone(),
        );
        registry.register(
            "projection_unreadable_events",
            "Events of a documented type whose fields a projection needs but could not read (docs/events.md)",
            self.metrics.unreadable.clone(),
        );
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, cost::TenantCosts>> {
        lock(&self.tenants)
    }

    /// Restores every tenant's figures from the state store (at start,
    /// before events are applied); hours past retention are deleted.
    /// Returns the hours restored.
    pub async fn load(&self, state: &State) -> anyhow::Result<usize> {
        let rows = state
            .list_all(COST_HOURS)
            .await
            .map_err(|e| anyhow::anyhow!("projections not restored: {e}"))?;
        let now_ms = clock::unix_millis();
        let mut restored = 0;
        let mut stale = Vec::new();
        {
            let mut tenants = self.lock();
            for (tenant, id, text) in rows {
                let ok = id.parse::<u64>().is_ok_and(|hour| {
                    tenants
                        .entry(tenant.clone())
                        .or_default()
                        .restore(hour, &text, now_ms)
                });
                if ok {
                    restored += 1;
                } else {
                    stale.push((tenant, id));
                }
            }
            tenants.retain(|_, t| !t.is_empty());
        }
        for (tenant, id) in stale {
            let _ = state.delete(COST_HOURS, &tenant, &id).await;
        }
        Ok(restored)
    }

    /// Writes the hours changed since the last save and deletes those that
    /// aged out. What fails to be written is tried again at the next save.
    pub async fn save(&self, state: &State) {
        let Unsaved { changed, removed } = std::mem::take(&mut *lock(&self.unsaved));
        let writes: Vec<(String, u64, String, String)> = {
            let tenants = self.lock();
            changed
                .into_iter()
                .filter_map(|(tenant, hour)| {
                    let text = tenants.get(&tenant)?.hour_record(hour)?;
                    Some((tenant, hour, hour.to_string(), text))
                })
                .collect()
        };
        let mut failed = Unsaved::default();
        for chunk in writes.chunks(SAVE_BATCH) {
            let results = futures_util::future::join_all(
                chunk
                    .iter()
                    .map(|(t, _, id, text)| state.put(COST_HOURS, t, id, text.clone())),
            )
            .await;
            for ((t, h, _, _), r) in chunk.iter().zip(results) {
                if let Err(e) = r {
                    tracing::warn!(tenant = %t, "cost figures not saved, trying again: {e}");
                    failed.changed.insert((t.clone(), *h));
                }
            }
        }
        let removed: Vec<(String, u64, String)> = removed
            .into_iter()
            .map(|(t, h)| (t, h, h.to_string()))
            .collect();
        for chunk in removed.chunks(SAVE_BATCH) {
            let results = futures_util::future::join_all(
                chunk
                    .iter()
                    .map(|(t, _, id)| state.delete(COST_HOURS, t, id)),
            )
            .await;
            for ((t, h, _), r) in chunk.iter().zip(results) {
                if r.is_err() {
                    failed.removed.insert((t.clone(), *h));
                }
            }
        }
        if !failed.changed.is_empty() || !failed.removed.is_empty() {
            let mut unsaved = lock(&self.unsaved);
            unsaved.changed.extend(failed.changed);
            unsaved.removed.extend(failed.removed);
        }
    }

    /// Applies one event to its tenant's models.
    pub fn apply(&self, event: &SharedEvent) {
        if event.event_type != cost::COST_UPDATED {
            return;
        }
        match cost::CostEvent::read(event) {
            Ok(c) => {
                let now_ms = clock::unix_millis();
                let mut removed = Vec::new();
                let changed = self.lock().entry(event.tenant_id.clone()).or_default().add(
                    &c,
                    now_ms,
                    &mut removed,
                );
                self.metrics.applied.inc();
                let mut unsaved = lock(&self.unsaved);
                for hour in removed {
                    let key = (event.tenant_id.clone(), hour);
                    unsaved.changed.remove(&key);
                    unsaved.removed.insert(key);
                }
                if let Some(hour) = changed {
                    unsaved.changed.insert((event.tenant_id.clone(), hour));
                }
            }
            Err(why) => {
                self.metrics.unreadable.inc();
                tracing::debug!(
                    tenant = %event.tenant_id,
                    event_id = %event.id,
                    event_type = %event.event_type,
                    "not in the projections: {why}"
                );
            }
        }
    }

    /// `tenant`'s costs over a window.
    pub fn cost_summary(&self, tenant: &str, query: &SummaryQuery) -> CostSummary {
        match self.lock().get(tenant) {
            Some(costs) => costs.summary(query),
            None => cost::TenantCosts::default().summary(query),
        }
    }

    /// `tenant`'s costs by workload tags over a window.
    pub fn workload_costs(&self, tenant: &str, query: &SummaryQuery) -> WorkloadCosts {
        match self.lock().get(tenant) {
            Some(costs) => costs.workloads(query),
            None => cost::TenantCosts::default().workloads(query),
        }
    }

    /// `tenant`'s costs by agent and workflow over a window.
    pub fn agent_costs(
        &self,
        tenant: &str,
        query: &SummaryQuery,
        agent: Option<&str>,
    ) -> AgentCosts {
        match self.lock().get(tenant) {
            Some(costs) => costs.agents(query, agent),
            None => cost::TenantCosts::default().agents(query, agent),
        }
    }

    /// The observer the broker hands dispatched events to, and what the
    /// task that applies them ([`Projections::run`]) reads.
    pub fn observer(&self, settings: &ProjectionSettings) -> (Box<dyn Persist>, Queue) {
        let (tx, rx) = mpsc::channel::<SharedEvent>(settings.projection_queue);
        let observer = Observer {
            tx,
            metrics: Arc::clone(&self.metrics),
            last_warning: AtomicU64::new(0),
        };
        (Box::new(observer), Queue(rx))
    }

    /// Applies the queue's events and saves changed hours every
    /// [`SAVE_INTERVAL`], until `stop`; then applies what is queued and
    /// saves once more.
    pub async fn run(self, queue: Queue, state: State, stop: CancellationToken) {
        let Queue(mut rx) = queue;
        let mut batch = Vec::with_capacity(256);
        let mut tick = tokio::time::interval(SAVE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        break;
                    }
                    for event in batch.drain(..) {
                        self.apply(&event);
                    }
                }
                _ = tick.tick() => self.save(&state).await,
                () = stop.cancelled() => break,
            }
        }
        rx.close();
        while let Ok(event) = rx.try_recv() {
            self.apply(&event);
        }
        self.save(&state).await;
    }
}

/// Events waiting for the projections.
pub struct Queue(mpsc::Receiver<SharedEvent>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Queues the events a projection reads; never blocks.
struct Observer {
    tx: mpsc::Sender<SharedEvent>,
    metrics: Arc<Metrics>,
    last_warning: AtomicU64,
}

impl Persist for Observer {
    fn offer(&self, event: &SharedEvent) {
        if event.event_type != cost::COST_UPDATED {
            return;
        }
        if self.tx.try_send(Arc::clone(event)).is_err() {
            self.metrics.dropped.inc();
            let now = clock::unix_secs();
            if self.last_warning.swap(now, Ordering::Relaxed) != now {
                tracing::error!(
                    tenant = %event.tenant_id,
                    event_id = %event.id,
                    "projection queue full (TC_PROJECTION_QUEUE): event left out of the MCP projections"
                );
            }
        }
    }
}

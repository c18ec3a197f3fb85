//! Per-tenant read models built from dispatched events (local and relayed
//! alike, so every instance answers the same), for the MCP tools.
//!
//! The broker hands each dispatched event of a type a projection reads to
//! [`Observer::offer`], which only queues it (bounded, never blocking the
//! publish path); one task applies the queue to the models. A tenant's
//! models are reached only with its own tenant id.

pub mod cost;
pub mod entities;

use std::collections::{HashMap, HashSet};
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
/// Alerts and recommendations: (tenant, their id) → the entity.
const COST_HOURS: &str = "cost_hours";
/// How often changed hours are written to the state store: what a crash
/// of every instance can take from the figures.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);
/// Writes in flight at once while saving.
const SAVE_BATCH: usize = 128;

pub use cost::{AgentCosts, CostSummary, SummaryQuery, WorkloadCosts};
pub use entities::{Agent, Alert, Connection, Instance, Recommendation};

use entities::{Entities, Entity};

/// Events waiting to be applied, at most (`TC_PROJECTION_QUEUE`).
#[derive(Debug, Clone, clap::Args)]
pub struct ProjectionSettings {
    /// Dispatched events waiting for the projections, at most; past it an
    /// event is left out of them (counted in
    /// `tc_projection_dropped_events_total` and logged).
    #[arg(long, env = "TC_PROJECTION_QUEUE", default_value_t = 65_536, value_parser = crate::config::parse::positive)]
    pub projection_queue: usize,

    /// Named cost entries (a source, a service, a tag value, an agent or a
    /// workflow, in one hour) kept per tenant over its 90 days, at most;
    /// past it new names are counted under `(other)`. About 100 bytes
    /// each.
    #[arg(long, env = "TC_COST_MAX_ENTRIES", default_value_t = cost::MAX_KEYS, value_parser = crate::config::parse::positive)]
    pub cost_max_entries: usize,
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
    /// Named cost entries per tenant, at most.
    cost_bound: CostBound,
    models: Arc<Mutex<Models>>,
    /// Records changed, and records gone, since the last save.
    unsaved: Arc<Mutex<Unsaved>>,
    metrics: Arc<Metrics>,
}

#[derive(Clone, Copy)]
struct CostBound(usize);

impl Default for CostBound {
    fn default() -> Self {
        Self(cost::MAX_KEYS)
    }
}

/// The models, each per tenant.
#[derive(Default)]
struct Models {
    costs: HashMap<String, cost::TenantCosts>,
    alerts: Entities<Alert>,
    recommendations: Entities<Recommendation>,
    instances: Entities<Instance>,
    connections: Entities<Connection>,
    agents: Entities<Agent>,
}

/// Which instances `fleet.list_instances` lists.
#[derive(Debug, Clone, Default)]
pub struct FleetFilter {
    /// Any of these states; all when empty.
    pub states: Vec<String>,
    pub provider: Option<String>,
    pub region: Option<String>,
    pub gpu_type: Option<String>,
    /// Listed at most (totals count every instance kept).
    pub limit: usize,
}

impl FleetFilter {
    fn keeps(&self, i: &Instance) -> bool {
        let is = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        (self.states.is_empty() || self.states.contains(&i.state))
            && is(&self.provider, &i.provider)
            && is(&self.region, &i.region)
            && is(&self.gpu_type, &i.gpu_type)
    }
}

/// `fleet.list_instances`'s answer.
#[derive(Debug, Clone, Default, serde::Serialize, schemars::JsonSchema)]
pub struct Fleet {
    /// Most recently changed first.
    pub instances: Vec<Instance>,
    /// Instances the filters kept, listed or not.
    pub matched: usize,
    /// Of those, running; their GPUs and their cost per hour.
    pub running: usize,
    pub running_gpus: u64,
    pub running_hourly_cost_usd: f64,
    /// More matched than `limit`: only the most recent are listed.
    pub truncated: bool,
}

/// A state record: (table, tenant, id).
type Key = (&'static str, String, String);

#[derive(Default)]
struct Unsaved {
    changed: HashSet<Key>,
    removed: HashSet<Key>,
}

impl Unsaved {
    fn mark_changed(&mut self, key: Key) {
        self.removed.remove(&key);
        self.changed.insert(key);
    }

    fn mark_removed(&mut self, key: Key) {
        self.changed.remove(&key);
        self.removed.insert(key);
    }
}

impl Models {
    /// A record's text as it is now.
    fn record(&self, (table, tenant, id): &Key) -> Option<String> {
        match *table {
            COST_HOURS => self.costs.get(tenant)?.hour_record(id.parse().ok()?),
            Alert::TABLE => self.alerts.record(tenant, id),
            Recommendation::TABLE => self.recommendations.record(tenant, id),
            Instance::TABLE => self.instances.record(tenant, id),
            Connection::TABLE => self.connections.record(tenant, id),
            Agent::TABLE => self.agents.record(tenant, id),
            _ => None,
        }
    }

    /// Puts a record back; false when it is not one (or too old).
    fn restore(
        &mut self,
        table: &'static str,
        tenant: &str,
        id: &str,
        text: &str,
        now_ms: u64,
    ) -> bool {
        match table {
            COST_HOURS => id.parse::<u64>().is_ok_and(|hour| {
                self.costs
                    .entry(tenant.to_string())
                    .or_default()
                    .restore(hour, text, now_ms)
            }),
            Alert::TABLE => self.alerts.restore(tenant, id, text),
            Recommendation::TABLE => self.recommendations.restore(tenant, id, text),
            Instance::TABLE => self.instances.restore(tenant, id, text),
            Connection::TABLE => self.connections.restore(tenant, id, text),
            Agent::TABLE => self.agents.restore(tenant, id, text),
            _ => false,
        }
    }
}

/// The event types the projections read.
fn observed(event_type: &str) -> bool {
    // Most events on the publish path end at their first word.
    let first = event_type
        .split_once('.')
        .map_or(event_type, |(first, _)| first);
    if !matches!(
        first,
        "cost" | "alert" | "recommendation" | "instance" | "system" | "agent" | "inference"
    ) {
        return false;
    }
    event_type == cost::COST_UPDATED
        || entities::ALERT_TYPES.contains(&event_type)
        || entities::RECOMMENDATION_TYPES.contains(&event_type)
        || entities::INSTANCE_TYPES.contains(&event_type)
        || entities::CONNECTION_TYPES.contains(&event_type)
        || entities::AGENT_TYPES.contains(&event_type)
        || event_type == entities::SPIKE_DETECTED
        || event_type == entities::THRESHOLD_EXCEEDED
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

    /// Projections keeping at most `settings`' named cost entries per
    /// tenant.
    pub fn new(settings: &ProjectionSettings) -> Self {
        Self {
            cost_bound: CostBound(settings.cost_max_entries),
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, Models> {
        lock(&self.models)
    }

    /// Restores every tenant's figures from the state store (at start,
    /// before events are applied); hours past retention are deleted.
    /// Returns the hours restored.
    pub async fn load(&self, state: &State) -> anyhow::Result<usize> {
        let now_ms = clock::unix_millis();
        let mut restored = 0;
        for table in [
            COST_HOURS,
            Alert::TABLE,
            Recommendation::TABLE,
            Instance::TABLE,
            Connection::TABLE,
            Agent::TABLE,
        ] {
            let rows = state
                .list_all(table)
                .await
                .map_err(|e| anyhow::anyhow!("projections not restored: {e}"))?;
            let mut stale = Vec::new();
            {
                let mut models = self.lock();
                for (tenant, id, text) in rows {
                    if models.restore(table, &tenant, &id, &text, now_ms) {
                        restored += 1;
                    } else {
                        stale.push((tenant, id));
                    }
                }
                models.costs.retain(|_, t| !t.is_empty());
            }
            for (tenant, id) in stale {
                let _ = state.delete(table, &tenant, &id).await;
            }
        }
        Ok(restored)
    }

    /// Writes the records changed since the last save and deletes those
    /// gone. What fails is tried again at the next save.
    pub async fn save(&self, state: &State) {
        let Unsaved { changed, removed } = std::mem::take(&mut *lock(&self.unsaved));
        let writes: Vec<(Key, String)> = {
            let models = self.lock();
            changed
                .into_iter()
                .filter_map(|key| {
                    let text = models.record(&key)?;
                    Some((key, text))
                })
                .collect()
        };
        let mut failed = Unsaved::default();
        for chunk in writes.chunks(SAVE_BATCH) {
            let results = futures_util::future::join_all(
                chunk
                    .iter()
                    .map(|((table, t, id), text)| state.put(table, t, id, text.clone())),
            )
            .await;
            for ((key, _), r) in chunk.iter().zip(results) {
                if let Err(e) = r {
                    tracing::warn!(tenant = %key.1, table = key.0, "projection not saved, trying again: {e}");
                    failed.changed.insert(key.clone());
                }
            }
        }
        let removed: Vec<Key> = removed.into_iter().collect();
        for chunk in removed.chunks(SAVE_BATCH) {
            let results = futures_util::future::join_all(
                chunk
                    .iter()
                    .map(|(table, t, id)| state.delete(table, t, id)),
            )
            .await;
            for (key, r) in chunk.iter().zip(results) {
                if r.is_err() {
                    failed.removed.insert(key.clone());
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
        let kind = event.event_type.as_str();
        let result = if kind == cost::COST_UPDATED {
            self.apply_cost(event)
        } else if entities::ALERT_TYPES.contains(&kind) {
            self.apply_entity(event, "alert_id", |m| &mut m.alerts, Alert::apply)
        } else if kind == entities::SPIKE_DETECTED {
            self.apply_entity(event, "spike_id", |m| &mut m.alerts, Alert::apply_spike)
        } else if kind == entities::THRESHOLD_EXCEEDED {
            self.apply_entity(
                event,
                "budget_id",
                |m| &mut m.alerts,
                Alert::apply_threshold,
            )
        } else if entities::RECOMMENDATION_TYPES.contains(&kind) {
            self.apply_entity(
                event,
                "recommendation_id",
                |m| &mut m.recommendations,
                Recommendation::apply,
            )
        } else if entities::INSTANCE_TYPES.contains(&kind) {
            self.apply_entity(event, "instance_id", |m| &mut m.instances, Instance::apply)
        } else if entities::CONNECTION_TYPES.contains(&kind) {
            self.apply_entity(
                event,
                "connection_id",
                |m| &mut m.connections,
                Connection::apply,
            )
        } else if entities::AGENT_TYPES.contains(&kind) {
            self.apply_entity(event, "agent_id", |m| &mut m.agents, Agent::apply)
        } else {
            return;
        };
        match result {
            Ok(()) => {
                self.metrics.applied.inc();
            }
            Err(why) => {
                self.metrics.unreadable.inc();
                tracing::debug!(
                    tenant = %event.tenant_id,
                    event_id = %event.id,
                    trace_id = %event.trace_id,
                    event_type = %event.event_type,
                    "not in the projections: {why}"
                );
            }
        }
    }

    fn apply_cost(&self, event: &SharedEvent) -> Result<(), String> {
        let c = cost::CostEvent::read(event)?;
        let now_ms = clock::unix_millis();
        let mut removed = Vec::new();
        let changed = self
            .lock()
            .costs
            .entry(event.tenant_id.clone())
            .or_default()
            .add(&c, now_ms, self.cost_bound.0, &mut removed);
        let mut unsaved = lock(&self.unsaved);
        for hour in removed {
            unsaved.mark_removed((COST_HOURS, event.tenant_id.clone(), hour.to_string()));
        }
        if let Some(hour) = changed {
            unsaved.mark_changed((COST_HOURS, event.tenant_id.clone(), hour.to_string()));
        }
        Ok(())
    }

    fn apply_entity<T: Entity>(
        &self,
        event: &SharedEvent,
        id_field: &str,
        model: impl FnOnce(&mut Models) -> &mut Entities<T>,
        apply: impl FnOnce(&mut Option<T>, &crate::event::Event, &serde_json::Value, &str),
    ) -> Result<(), String> {
        let (data, mut id) = entities::read_id(event, id_field)?;
        if event.event_type == "alert.created" && entities::is_derived_alert_id(&id) {
            return Err(format!(
                "alert_id: {id:?} starts with the prefix of the alerts other events stand for (spike:, budget:)"
            ));
        }
        // Spikes and thresholds are alerts, in id spaces of their own.
        id.insert_str(0, entities::alert_prefix(&event.event_type));
        let evicted = model(&mut self.lock())
            .upsert(&event.tenant_id, &id, |slot| apply(slot, event, &data, &id));
        let mut unsaved = lock(&self.unsaved);
        for gone in evicted {
            unsaved.mark_removed((T::TABLE, event.tenant_id.clone(), gone));
        }
        unsaved.mark_changed((T::TABLE, event.tenant_id.clone(), id));
        Ok(())
    }

    /// `tenant`'s alerts, most recently changed first: those in `states`
    /// (all when empty) of `severities` (all when empty), at most `limit`.
    pub fn alerts(
        &self,
        tenant: &str,
        states: &[String],
        severities: &[String],
        limit: usize,
    ) -> Vec<Alert> {
        let models = self.lock();
        models
            .alerts
            .latest_first(tenant)
            .into_iter()
            .filter(|a| states.is_empty() || states.contains(&a.state))
            .filter(|a| {
                severities.is_empty() || a.severity.as_ref().is_some_and(|s| severities.contains(s))
            })
            .take(limit)
            .cloned()
            .collect()
    }

    /// `tenant`'s open recommendations of `category` and `provider` (any
    /// when none), largest estimated savings first, at most `limit`.
    pub fn open_recommendations(
        &self,
        tenant: &str,
        category: Option<&str>,
        provider: Option<&str>,
        limit: usize,
    ) -> Vec<Recommendation> {
        let models = self.lock();
        let mut list: Vec<Recommendation> = models
            .recommendations
            .latest_first(tenant)
            .into_iter()
            .filter(|r| r.state == "open")
            .filter(|r| category.is_none_or(|c| r.category.as_deref() == Some(c)))
            .filter(|r| provider.is_none_or(|p| r.provider.as_deref() == Some(p)))
            .cloned()
            .collect();
        list.sort_by(|a, b| {
            b.estimated_monthly_savings_usd
                .unwrap_or(0.0)
                .total_cmp(&a.estimated_monthly_savings_usd.unwrap_or(0.0))
                .then(a.recommendation_id.cmp(&b.recommendation_id))
        });
        list.truncate(limit);
        list
    }

    /// `tenant`'s instances that `filter` keeps, most recently changed
    /// first, with totals over every one it keeps.
    pub fn fleet(&self, tenant: &str, filter: &FleetFilter) -> Fleet {
        let models = self.lock();
        let mut fleet = Fleet::default();
        for i in models.instances.latest_first(tenant) {
            if !filter.keeps(i) {
                continue;
            }
            fleet.matched += 1;
            if i.state == "running" {
                fleet.running += 1;
                fleet.running_gpus += u64::from(i.gpu_count.unwrap_or(0));
                fleet.running_hourly_cost_usd += i.hourly_cost_usd.unwrap_or(0.0);
            }
            if fleet.instances.len() < filter.limit {
                fleet.instances.push(i.clone());
            }
        }
        fleet.truncated = fleet.matched > fleet.instances.len();
        fleet
    }

    /// One of `tenant`'s recommendations, as it stands.
    pub fn recommendation(&self, tenant: &str, id: &str) -> Option<Recommendation> {
        self.lock().recommendations.get(tenant, id).cloned()
    }

    /// `tenant`'s connections, failing first, then by id.
    pub fn connections(&self, tenant: &str) -> Vec<Connection> {
        let models = self.lock();
        let mut list: Vec<Connection> = models
            .connections
            .latest_first(tenant)
            .into_iter()
            .cloned()
            .collect();
        list.sort_by(|a, b| {
            (a.status == "ok")
                .cmp(&(b.status == "ok"))
                .then(a.connection_id.cmp(&b.connection_id))
        });
        list
    }

    /// `tenant`'s costs over a window.
    pub fn cost_summary(&self, tenant: &str, query: &SummaryQuery) -> CostSummary {
        match self.lock().costs.get(tenant) {
            Some(costs) => costs.summary(query),
            None => cost::TenantCosts::default().summary(query),
        }
    }

    /// `tenant`'s costs by workload tags over a window.
    pub fn workload_costs(&self, tenant: &str, query: &SummaryQuery) -> WorkloadCosts {
        match self.lock().costs.get(tenant) {
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
        let models = self.lock();
        let mut costs = match models.costs.get(tenant) {
            Some(costs) => costs.agents(query, agent),
            None => cost::TenantCosts::default().agents(query, agent),
        };
        // Presence of the agents listed, and of every connected one.
        costs.presence = match agent {
            Some(one) => models
                .agents
                .get(tenant, one)
                .cloned()
                .into_iter()
                .collect(),
            None => {
                let listed: HashSet<&str> =
                    costs.by_agent.iter().map(|a| a.name.as_str()).collect();
                models
                    .agents
                    .latest_first(tenant)
                    .into_iter()
                    .filter(|a| listed.contains(a.agent_id.as_str()) || a.status == "connected")
                    .take(query.top)
                    .cloned()
                    .collect()
            }
        };
        costs.connected = models.agents.count(tenant, |a| a.status == "connected");
        costs
    }

    /// The observer the broker hands dispatched events to, and what the
    /// task that applies them ([`Projections::run`]) reads.
    pub fn observer(&self, settings: &ProjectionSettings) -> (Box<dyn Persist>, Queue) {
        let (tx, rx) = mpsc::channel::<SharedEvent>(settings.projection_queue);
        let observer = Observer {
            tx,
            metrics: Arc::clone(&self.metrics),
            warning: clock::OncePerSecond::default(),
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
    warning: clock::OncePerSecond,
}

impl Persist for Observer {
    fn offer(&self, event: &SharedEvent) {
        if !observed(&event.event_type) {
            return;
        }
        if self.tx.try_send(Arc::clone(event)).is_err() {
            self.metrics.dropped.inc();
            if self.warning.due() {
                tracing::error!(
                    tenant = %event.tenant_id,
                    event_id = %event.id,
                    trace_id = %event.trace_id,
                    "projection queue full (TC_PROJECTION_QUEUE): event left out of the MCP projections"
                );
            }
        }
    }
}

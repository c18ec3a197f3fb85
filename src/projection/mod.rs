//! Per-tenant read models built from dispatched events (local and relayed
//! alike, so every instance answers the same), for the MCP tools.
//!
//! The broker hands each dispatched event of a type a projection reads to
//! [`Observer::offer`], which only queues it (bounded, never blocking the
//! publish path); one task applies the queue to the models. A tenant's
//! models are reached only with its own tenant id.

pub mod cost;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::Persist;
use crate::clock;
use crate::event::SharedEvent;

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
    metrics: Arc<Metrics>,
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
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one event to its tenant's models.
    pub fn apply(&self, event: &SharedEvent) {
        if event.event_type != cost::COST_UPDATED {
            return;
        }
        match cost::CostEvent::read(event) {
            Ok(c) => {
                let now_ms = clock::unix_millis();
                self.lock()
                    .entry(event.tenant_id.clone())
                    .or_default()
                    .add(&c, now_ms);
                self.metrics.applied.inc();
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

    /// The observer the broker hands dispatched events to, and the task
    /// (to spawn) that applies them until `stop`.
    pub fn start(
        &self,
        settings: &ProjectionSettings,
        stop: CancellationToken,
    ) -> (Box<dyn Persist>, impl Future<Output = ()> + Send + 'static) {
        let (tx, mut rx) = mpsc::channel::<SharedEvent>(settings.projection_queue);
        let projections = self.clone();
        let task = async move {
            let mut batch = Vec::with_capacity(256);
            loop {
                let n = tokio::select! {
                    n = rx.recv_many(&mut batch, 256) => n,
                    () = stop.cancelled() => return,
                };
                if n == 0 {
                    return;
                }
                for event in batch.drain(..) {
                    projections.apply(&event);
                }
            }
        };
        let observer = Observer {
            tx,
            metrics: Arc::clone(&self.metrics),
            last_warning: AtomicU64::new(0),
        };
        (Box::new(observer), task)
    }
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

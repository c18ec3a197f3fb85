//! The broker's [`Persist`] for Redis: hands locally accepted events to the
//! writer's bounded channel without ever waiting. Past the bound an event is
//! delivered locally but lost to other instances: counted, and logged at
//! most once a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::StoreMetrics;
use crate::broker::Persist;
use crate::event::SharedEvent;

/// Hands locally accepted events to the writer without ever waiting.
pub(super) struct Sink {
    tx: mpsc::Sender<SharedEvent>,
    metrics: StoreMetrics,
    last_warning: AtomicU64,
    lost_since_warning: AtomicU64,
}

impl Sink {
    pub(super) fn new(tx: mpsc::Sender<SharedEvent>, metrics: StoreMetrics) -> Self {
        Self {
            tx,
            metrics,
            last_warning: AtomicU64::new(0),
            lost_since_warning: AtomicU64::new(0),
        }
    }
}

impl Persist for Sink {
    fn offer(&self, event: &SharedEvent) {
        match self.tx.try_send(Arc::clone(event)) {
            Ok(()) => {
                self.metrics.buffered.inc();
            }
            Err(_) => {
                // Delivered locally, but other instances will never see it.
                self.metrics.lost.inc();
                let lost = self.lost_since_warning.fetch_add(1, Ordering::Relaxed) + 1;
                let now = crate::clock::unix_secs();
                let last = self.last_warning.load(Ordering::Relaxed);
                if now > last
                    && self
                        .last_warning
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    self.lost_since_warning.store(0, Ordering::Relaxed);
                    tracing::error!(
                        lost,
                        last_id = %event.id,
                        trace_id = %event.trace_id,
                        tenant = %event.tenant_id,
                        "Redis write buffer full (TC_REDIS_BUFFER): events delivered locally but lost to other instances"
                    );
                }
            }
        }
    }
}
